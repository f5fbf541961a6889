"""proxy: accept, pick a backend, connect, forward: the per-connection path.

Owns: the listener's accept handler (``server``), the choice of channel
(``routing``), the connect race and its stagger (``connect``, ``stagger``),
the byte pumps between client and backend (``forward``) with their libev
watchers (``watchers``), the PROXY protocol (``proxyproto``) and ``-A``'s
front door (``frontdoor``), and ``-d``'s hex dump (``dump``).  The hot
path: no locking, no logging, no avoidable allocation per connection.

May import: ``table``, ``system`` and the base modules (``gbalance.errors``,
``gbalance.log``, ``gbalance.clock``).  It does not know which process it
runs in (``process`` builds it) and never reads the config record.
"""
