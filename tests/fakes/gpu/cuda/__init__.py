"""Stand-in for cuda-python's ``cuda`` package (see tests/fakes/README.md)."""
