"""tlrun: a hardened launcher for Celery workers."""

__version__ = "0.1.0"
