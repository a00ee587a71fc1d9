"""Test-wide fixtures: real Postgres, Redis and SeaweedFS, and the tiny checkpoint, each set up once per run."""

pytest_plugins = [
    "tests.fixtures.edit_models",
    "tests.fixtures.models",
    "tests.fixtures.s3",
    "tests.fixtures.services",
]
