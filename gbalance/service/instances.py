"""The proxies of /etc/balance.conf: one reader for the init script and systemd.

``balance-instances`` (installed by the OS packages as
/usr/lib/gbalance/balance-instances) serves both init systems, so that both
read the file the same way::

  balance-instances list               valid lines: "<line> <instance> <arguments>"
  balance-instances check              report bad lines, exit 0 (for systemd)
  balance-instances verify             report bad lines, exit 78 if any (init script "check")
  balance-instances start|stop|status  the SysV init script's actions
  balance-instances restart            hand every instance over to a new master (-r)
  balance-instances exec INSTANCE      systemd ExecStart: become "balance -f <arguments>"
  balance-instances replace INSTANCE   systemd ExecReload: "balance -r <arguments>", MAINPID=
  balance-instances generate DIR ...   systemd generator: one balance@ unit per line
  balance-instances metrics DIR        node_exporter textfile collector files
  balance-instances health             exit 0 only if every instance is up and accepting

This module only dispatches; the work is split by job: the config file
(:mod:`~gbalance.service.conffile`), the masters of its lines
(:mod:`~gbalance.service.masters`), the init script's actions
(:mod:`~gbalance.service.sysv`), systemd's (:mod:`~gbalance.service.systemd`),
the metrics files (:mod:`~gbalance.service.metrics`) and keepalived's check
(:mod:`~gbalance.service.health`).

Environment (for tests and unusual setups): BALANCE_CONF (the config file),
BALANCE_BIN (the balance command), BALANCE_STATE_DIR (as for balance),
BALANCE_UNIT_DIR (where the generator's links point).
"""

from __future__ import annotations

import sys

from gbalance.service import health
from gbalance.service.conffile import Out
from gbalance.service.metrics import do_metrics
from gbalance.service.systemd import do_exec, do_generate, do_replace
from gbalance.service.sysv import do_check, do_list, do_restart, do_start, do_status, do_stop, do_verify


USAGE = ("usage: balance-instances start|stop|restart|status|list|check|verify"
         " | exec INSTANCE | replace INSTANCE | generate DIR... | metrics DIR | health")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``balance-instances``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    out = Out()
    actions = {"start": do_start, "stop": do_stop, "restart": do_restart, "status": do_status,
               "list": do_list, "check": do_check, "verify": do_verify}
    try:
        if len(argv) == 1 and argv[0] in actions:
            return int(actions[argv[0]](out))
        if len(argv) == 2 and argv[0] == "exec":
            return do_exec(argv[1], out, "-f")
        if len(argv) == 2 and argv[0] == "replace":
            return do_replace(argv[1], out)
        if len(argv) >= 2 and argv[0] == "generate":
            return do_generate(argv[1], out)
        if len(argv) == 2 and argv[0] == "metrics":
            return do_metrics(argv[1], out)
        if argv == ["health"]:   # keepalived's vrrp_script (gbalance.service.health)
            return health.run(out)
    except SystemExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line, never a traceback
        out.problem(f"balance-instances: internal error: {type(exc).__name__}: {exc}")
        return 70
    out.problem(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())

