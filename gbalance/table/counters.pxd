# Written by hand (packaging/gen-pxd.py makes only forward's and connect's):
# when setup.py compiles gbalance/table/counters.py, Counters becomes an
# extension type whose table is a typed view of the state file's 64-bit
# slots (a count is a load and a store), its row and base C integers and
# the layout's slot numbers C constants (no attributes of this module then:
# import them from gbalance.table.layout).  The pure-Python module ignores
# this file; keep the fields in step with the __slots__.

cimport cython

cdef Py_ssize_t C_C, C_MAXC, C_SLOTS, C_TOTALC, CHANNEL_BASE, MAXCHANNELS

cdef class Counters:
    cdef readonly long long[:] q
    cdef readonly Py_ssize_t off
    cdef readonly Py_ssize_t rows
    cdef readonly int lock_fd
    cdef public Py_ssize_t held

    @cython.locals(q=cython.longlong[:], maxc=cython.longlong)
    cpdef bint room(self, Py_ssize_t base) except -1
    @cython.locals(q=cython.longlong[:], i=Py_ssize_t)
    cpdef count_attempt(self, Py_ssize_t base)
    @cython.locals(q=cython.longlong[:], base=Py_ssize_t, i=Py_ssize_t)
    cpdef attempt(self, Py_ssize_t g, Py_ssize_t c)
    cpdef uncount(self, Py_ssize_t base)
