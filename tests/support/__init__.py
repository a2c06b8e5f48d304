"""Test helpers: real databases and real server processes."""
