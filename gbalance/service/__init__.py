"""service: running the proxies of /etc/balance.conf under an init system.

Owns: ``balance-instances`` (``instances``: the config file, SysV actions,
systemd's units, metrics files) and keepalived's health check (``health``).
It starts and stops ``balance`` as child processes and reads their state
files; it never runs a proxy in its own process.

May import: ``gbalance.cli`` (to read a line as balance would), the config
layer, ``shell`` (the metrics format), ``table``, ``system`` and the base
modules.  Not ``proxy``, ``monitor`` or ``process``.
"""
