"""Celery GPU worker and its inference engine."""
