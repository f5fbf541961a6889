"""Stands in for the ``cython`` module where Cython is not installed.

The hot-path modules ``import cython`` to ask ``cython.compiled``: True
only in their compiled build (which then makes its system calls directly,
see csys.pxd), False when they run as Python, with or without Cython.
"""

compiled = False
