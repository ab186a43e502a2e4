"""Jobs: the job store (the source of truth), its schema, routing rules and the lease rule."""
