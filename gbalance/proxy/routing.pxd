# Written by hand (packaging/gen-pxd.py makes only forward's and connect's):
# when setup.py compiles gbalance/proxy/routing.py, Router, Candidates and
# Rendezvous become extension types, the router's table a typed view of the
# state file's 64-bit slots (a read is a load), the slot numbers C constants
# (they are then no attributes of this module: import them from
# gbalance.table.layout), the per-connection helpers C functions with C
# integer locals, and a Candidates' next() a C slot.  The pure-Python module
# ignores this file; keep the fields in step with the __slots__.

cimport cython

cdef Py_ssize_t C_C, C_MAXC, C_STATUS, C_SUSPECT, C_SLOTS, CHANNEL_BASE, G_SLOTS, GROUP_BASE
cdef Py_ssize_t G_NCHANNELS, G_RR_NEXT, G_TYPE, H_GENERATION, H_NGROUPS, MAXCHANNELS, MAXGROUPS
cdef long long HASH, _ENABLED, _KEY_SHIFT, _UNKNOWN

cpdef long long client_hash(str address) except -1
cpdef long long client_key(str address) except -1

cdef class Rendezvous
cdef class Router
cdef class Candidates

cdef class Rendezvous:
    cdef public tuple seeds
    cdef public Py_ssize_t n
    cdef public long long generation
    cdef public bytearray winners
    cdef public object _a, _b
    cdef public Py_ssize_t _nbytes

    @cython.locals(c=Py_ssize_t)
    cpdef Py_ssize_t best(self, Py_ssize_t key) except -1

cdef class Router:
    cdef public object state
    cdef readonly long long[:] q
    cdef public object rings
    cdef public bint hash_failover
    cdef public bint last_resort
    cdef public object counters
    cdef public object cursors

    @cython.locals(q=cython.longlong[:], b=Py_ssize_t, maxc=cython.longlong)
    cdef bint _usable(self, Py_ssize_t g, Py_ssize_t c) except -1
    @cython.locals(it=Candidates)
    cpdef Candidates candidates(self, client)
    @cython.locals(q=cython.longlong[:], n=Py_ssize_t, start=Py_ssize_t, i=Py_ssize_t, c=Py_ssize_t,
                   b=Py_ssize_t)
    cdef object _first(self, Candidates it)
    @cython.locals(ring=Rendezvous, generation=cython.longlong)
    cpdef Rendezvous _ring(self, Py_ssize_t g, Py_ssize_t n)
    cdef Py_ssize_t _cursor(self, Py_ssize_t g, Py_ssize_t n) except -1
    @cython.locals(c=Py_ssize_t)
    cdef Py_ssize_t _next_rr(self, Py_ssize_t g, Py_ssize_t n, Py_ssize_t start, Py_ssize_t i) except -1

cdef class Candidates:
    cdef Router router
    cdef object client
    cdef object rest
    cdef Py_ssize_t g, i, start, n
