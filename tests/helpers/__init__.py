"""Plain helpers shared by test modules: constants and functions, no fixtures and no tests."""
