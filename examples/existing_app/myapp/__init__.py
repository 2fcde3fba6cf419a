"""An existing Celery application that taskgate fronts (see docs/workers.md)."""
