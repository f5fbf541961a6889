"""gbalance: a gevent re-implementation of balance, the userland TCP proxy."""

__version__ = "1.0.0"
