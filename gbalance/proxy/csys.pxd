# The compiled hot path's system calls, made directly on descriptors.
#
# Hand-written (packaging/gen-pxd.py makes the .pxd files of forward,
# connect and server cimport it).  Only the compiled build uses it: the
# .py modules call these under ``if cython.compiled:`` and keep their
# socket-method code as the pure-Python path, which behaves the same.
#
# Each call holds the GIL (every socket here is non-blocking or used with
# MSG_DONTWAIT, so nothing waits), retries EINTR as CPython's socket
# methods do (PEP 475), and returns -errno on failure instead of raising;
# GBC_AGAIN stands for every errno Python raises as BlockingIOError.
# Written for Cython 0.29 (Debian bookworm) and 3.x alike.

cdef extern from *:
    """
    #include <sys/socket.h>
    #include <netinet/in.h>
    #include <netinet/tcp.h>
    #include <fcntl.h>
    #include <poll.h>
    #include <errno.h>
    #include <string.h>
    #include <unistd.h>
    #include <arpa/inet.h>

    #define GBC_AGAIN (-EAGAIN)

    /* CPython's socket object (Modules/socketmodule.h) starts with its
       descriptor; gbc_fd reads it there for _socket.socket and its
       subclasses, and asks fileno() of anything else. */
    typedef struct { PyObject_HEAD int sock_fd; } gbc_sock_head;
    static PyTypeObject *gbc_socktype = NULL;

    static inline int gbc_init(PyObject *socktype) {
        if (!PyType_Check(socktype)) {
            PyErr_SetString(PyExc_TypeError, "gbc_init: not a type");
            return -1;
        }
        Py_INCREF(socktype);
        gbc_socktype = (PyTypeObject *)socktype;
        return 0;
    }

    static inline int gbc_fd(PyObject *sock) {
        if (gbc_socktype != NULL && PyObject_TypeCheck(sock, gbc_socktype))
            return ((gbc_sock_head *)sock)->sock_fd;
        return PyObject_AsFileDescriptor(sock);
    }

    static inline Py_ssize_t gbc_fail(void) {
        int e = errno;
        if (e == EAGAIN || e == EWOULDBLOCK || e == EINPROGRESS || e == EALREADY)
            return GBC_AGAIN;
        return -(Py_ssize_t)e;
    }

    /* recv() into a bytearray's first n bytes. */
    static inline Py_ssize_t gbc_recv_into(int fd, PyObject *buf, Py_ssize_t n, int flags) {
        ssize_t r;
        if (!PyByteArray_Check(buf)) return -EINVAL;
        if (n > PyByteArray_GET_SIZE(buf)) n = PyByteArray_GET_SIZE(buf);
        do r = recv(fd, PyByteArray_AS_STRING(buf), (size_t)n, flags);
        while (r < 0 && errno == EINTR);
        return r < 0 ? gbc_fail() : (Py_ssize_t)r;
    }

    /* send() of bytes or a bytearray from offset start to end. */
    static inline Py_ssize_t gbc_send(int fd, PyObject *buf, Py_ssize_t start, Py_ssize_t end, int flags) {
        const char *p;
        Py_ssize_t size;
        ssize_t r;
        if (PyBytes_Check(buf)) {
            p = PyBytes_AS_STRING(buf);
            size = PyBytes_GET_SIZE(buf);
        } else if (PyByteArray_Check(buf)) {
            p = PyByteArray_AS_STRING(buf);
            size = PyByteArray_GET_SIZE(buf);
        } else {
            PyErr_SetString(PyExc_TypeError, "gbc_send: bytes or bytearray");
            return -1;
        }
        if (end > size) end = size;
        if (start < 0 || start > end) {
            PyErr_SetString(PyExc_ValueError, "gbc_send: bad range");
            return -1;
        }
        do r = send(fd, p + start, (size_t)(end - start), flags);
        while (r < 0 && errno == EINTR);
        return r < 0 ? gbc_fail() : (Py_ssize_t)r;
    }

    /* Linux: the peer's end is in (CLOSE_WAIT): the sequence space received
       (tcpi_bytes_received, bytes + urgent byte + 1 for the end); else -1. */
    static inline long long gbc_end_seen(int fd) {
    #ifdef TCP_INFO
        unsigned char info[136];
        socklen_t len = sizeof info;
        unsigned long long got;
        if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &len) < 0 || len < sizeof info || info[0] != 8)
            return -1;
        memcpy(&got, info + 128, sizeof got);
        return (long long)got;
    #else
        return -1;
    #endif
    }

    static inline int gbc_shutdown(int fd, int how) {
        return shutdown(fd, how) < 0 ? -errno : 0;
    }

    static inline int gbc_setowner(int fd, int pid) {
        return fcntl(fd, F_SETOWN, pid) < 0 ? -errno : 0;
    }

    /* A backend socket's options: TCP_NODELAY and SO_KEEPALIVE on. */
    static inline int gbc_backend_options(int fd) {
        int on = 1;
        if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on) < 0) return -errno;
        if (setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on) < 0) return -errno;
        return 0;
    }

    /* recv() of up to n bytes into a new bytes object; an int (-errno,
       GBC_AGAIN) when it fails. */
    static inline PyObject *gbc_recv_bytes(int fd, Py_ssize_t n, int flags) {
        PyObject *data;
        ssize_t r;
        if (n < 0) n = 0;
        data = PyBytes_FromStringAndSize(NULL, n);
        if (data == NULL) return NULL;
        do r = recv(fd, PyBytes_AS_STRING(data), (size_t)n, flags);
        while (r < 0 && errno == EINTR);
        if (r < 0) {
            Py_ssize_t err = gbc_fail();
            Py_DECREF(data);
            return PyLong_FromSsize_t(err);
        }
        if (r != n && _PyBytes_Resize(&data, (Py_ssize_t)r) < 0) return NULL;
        return data;
    }

    /* socket.close() of a _socket.socket, as CPython's sock_close does it
       (the descriptor marked closed first, ECONNRESET ignored, another
       error raised as OSError) without letting go of the GIL; any other
       object's close() is called. */
    static inline int gbc_close(PyObject *sock) {
        int fd;
        if (gbc_socktype == NULL || Py_TYPE(sock) != gbc_socktype) {
            PyObject *r = PyObject_CallMethod(sock, "close", NULL);
            if (r == NULL) return -1;
            Py_DECREF(r);
            return 0;
        }
        fd = ((gbc_sock_head *)sock)->sock_fd;
        if (fd != -1) {
            ((gbc_sock_head *)sock)->sock_fd = -1;
            if (close(fd) < 0 && errno != ECONNRESET) {
                PyErr_SetFromErrno(PyExc_OSError);
                return -1;
            }
        }
        return 0;
    }

    /* accept4() (close-on-exec, as CPython's socket._accept) on a
       non-blocking listener: (fd, address) with the address tuple
       socket._accept gives for AF_INET and AF_INET6, or an int (-errno,
       GBC_AGAIN) when it fails.  IPv4 is written here, IPv6 by inet_ntop
       as CPython does. */
    static inline PyObject *gbc_accept(int lfd) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        PyObject *host, *addr, *res;
        int fd;
        do fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_CLOEXEC);
        while (fd < 0 && errno == EINTR);
        if (fd < 0) return PyLong_FromSsize_t(gbc_fail());
        if (len == 0) {
            addr = Py_None;
            Py_INCREF(addr);
        } else if (ss.ss_family == AF_INET) {
            const struct sockaddr_in *a = (const struct sockaddr_in *)&ss;
            const unsigned char *b = (const unsigned char *)&a->sin_addr;
            char text[16], *p = text;
            int i;
            for (i = 0; i < 4; i++) {
                unsigned v = b[i];
                if (i) *p++ = '.';
                if (v >= 100) { *p++ = (char)('0' + v / 100); v %= 100; *p++ = (char)('0' + v / 10); v %= 10; }
                else if (v >= 10) { *p++ = (char)('0' + v / 10); v %= 10; }
                *p++ = (char)('0' + v);
            }
            host = PyUnicode_FromStringAndSize(text, p - text);
            addr = host ? Py_BuildValue("Ni", host, (int)ntohs(a->sin_port)) : NULL;
        } else if (ss.ss_family == AF_INET6) {
            const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&ss;
            char text[INET6_ADDRSTRLEN];
            if (inet_ntop(AF_INET6, &a->sin6_addr, text, sizeof text) == NULL) {
                PyErr_SetFromErrno(PyExc_OSError);
                addr = NULL;
            } else {
                host = PyUnicode_FromString(text);
                addr = host ? Py_BuildValue("Niii", host, (int)ntohs(a->sin6_port),
                                            (int)ntohl(a->sin6_flowinfo), (int)a->sin6_scope_id) : NULL;
            }
        } else {
            PyErr_SetString(PyExc_OSError, "gbc_accept: not an IPv4 or IPv6 listener");
            addr = NULL;
        }
        if (addr == NULL) {
            close(fd);
            return NULL;
        }
        res = Py_BuildValue("iN", fd, addr);
        if (res == NULL) close(fd);
        return res;
    }

    /* A zero-timeout poll of one descriptor: its revents (0: nothing). */
    static inline int gbc_poll1(int fd, int events) {
        struct pollfd p;
        int r;
        p.fd = fd;
        p.events = (short)events;
        p.revents = 0;
        do r = poll(&p, 1, 0);
        while (r < 0 && errno == EINTR);
        return r < 0 ? -errno : (r ? p.revents : 0);
    }
    """
    const Py_ssize_t GBC_AGAIN
    int gbc_init(object) except -1
    int gbc_fd(object) except? -1
    Py_ssize_t gbc_recv_into(int, object, Py_ssize_t, int)
    Py_ssize_t gbc_send(int, object, Py_ssize_t, Py_ssize_t, int) except? -1
    long long gbc_end_seen(int)
    int gbc_shutdown(int, int)
    int gbc_setowner(int, int)
    int gbc_backend_options(int)
    int gbc_poll1(int, int)
    object gbc_recv_bytes(int, Py_ssize_t, int)
    object gbc_accept(int)
    int gbc_close(object) except -1
