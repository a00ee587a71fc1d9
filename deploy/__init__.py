"""Deployment helpers: a local SeaweedFS S3 server for development and tests."""
