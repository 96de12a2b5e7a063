"""Makes `classifier` importable in the tests: pytest puts this file's folder on sys.path."""
