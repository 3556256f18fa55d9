"""Importing it retains and pushes the primary context, as pycuda's does; :data:`IMPORTED` records that."""

IMPORTED = True
