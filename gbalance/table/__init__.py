"""table: the shared state file and everything that reads or writes it.

Owns: the layout of the mapped table and the file's life cycle (``state``),
the channel state machine, the one path for status changes (``channels``),
the per-process connection counters and the maxc lock (``counters``), the
shell's request mailbox inside the file (``mailbox``) and what a reload
copies from the replaced master's table (``carry``).

May import: ``system`` and the base modules (``gbalance.errors``,
``gbalance.log``, ``gbalance.clock``); never the layers that use the table
(proxy, monitor, process, shell, service).
"""
