"""Celery workers: claim jobs, run lomo_core training in a child process, stream results to the database."""
