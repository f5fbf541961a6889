"""system: what the kernel, libc and systemd offer, wrapped for the rest.

Owns: starting a child process that picks up nothing from the caller
(``child``), detaching (``daemon``), the libev loop without per-turn getpid
(``evloop``), descriptor limits (``limits``), surviving a mapped file cut
short (``mapguard``) and systemd's readiness protocol (``notify``).  Nothing
here knows what a channel or a connection is.

May import: the base modules (``gbalance.errors``, ``gbalance.log``,
``gbalance.clock``) and the standard library; no other layer.
"""
