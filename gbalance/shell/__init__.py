"""shell: ``balance -i`` and ``balance -c``, the live control shell.

Owns: finding and asking a running master (``control``), the command table
and its answers (``commands``), Tab completion (``completion``), the text
formats of tables, MRTG and metrics (``render``) and the interactive loop
(``shell``).  A shell never writes the table itself: every change is a
request through the table's mailbox.

May import: the config layer (``gbalance.config``, ``gbalance.arguments``),
``table``, ``system`` and the base modules.  Not ``proxy``, ``monitor`` or
``process``: the shell runs in its own process.
"""
