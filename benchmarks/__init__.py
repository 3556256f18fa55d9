"""Benchmarks: scripts that measure edgeopt's stages on this machine and write docs/."""
