"""The audit room of the privacy service (see services/privacy/__init__.py)."""
