"""process: the processes of a running proxy and how one hands over to the next.

Owns: the master's life (start, signals, drain, stop: ``master``), the
worker processes of ``-w N`` and their supervision (``worker``, ``pool``)
and the hand-over of the listener and state file to a new master on ``-r``
(``handover``).

May import: ``gbalance.wiring`` (the serving objects of one process), the
config layer (``gbalance.config``, ``gbalance.arguments``), ``proxy``,
``monitor``, ``table``, ``system`` and the base modules.  Not
``shell`` or ``service``: those talk to a master through the table.
"""
