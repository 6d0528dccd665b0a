"""The node: everything a municipality runs next to its own data."""
