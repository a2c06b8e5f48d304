"""Authentication: bearer tokens verified once per request or connection (see tokens.py)."""
