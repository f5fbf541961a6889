"""monitor: health checks (``-M``) that mark channels up and down.

Owns: the ``-M`` argument and its check kinds (``monspec``) and the master's
check rounds, whose results go through the table's state machine
(``monitor``).

May import: ``table``, ``system`` and the base modules (``gbalance.errors``,
``gbalance.log``, ``gbalance.clock``); not ``proxy``.
"""
