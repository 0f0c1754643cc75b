"""Stand-ins for upstream models in tests: objects with the real interfaces and no weights."""
