"""Work: the Celery app and its tasks, the steps they run, and the node's own worker processes."""
