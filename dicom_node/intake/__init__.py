"""Intake: what the node receives and keeps (C-STORE SCP, spool); see :mod:`dicom_node` for the modules."""
