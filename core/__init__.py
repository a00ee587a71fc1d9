"""Shared domain of the Z-Image job service: settings, database, schemas, job state machine, queue, storage."""
