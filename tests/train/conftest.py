"""The trainer tests' fixtures live in tests/conftest.py (task folders, the local Ray instance)."""
