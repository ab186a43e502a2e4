"""Demo and test harnesses (Orthanc, a receiving SCP, the demo command): not part of the product's path."""
