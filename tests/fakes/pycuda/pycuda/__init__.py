"""Stand-in for pycuda (see tests/fakes/README.md): host memory, copies recorded in ``driver.CALLS``."""
