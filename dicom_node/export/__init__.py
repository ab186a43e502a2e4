"""Export: results back to the PACS over DIMSE, and what each send came to."""
