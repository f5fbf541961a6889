"""A throwaway root: the host's own system, writable, in a private mount namespace.

The packaging tests install the built .deb with apt, run its maintainer
scripts, generate a locale, start daemons from /etc/balance.conf and purge
it all again.  None of that may touch the host's /etc, /usr or dpkg
database, and a gbalance already installed on the host must not matter.
So every such step runs in a root made like this:

- ``unshare --mount`` gives a private mount namespace held open by one
  process (``sleep infinity``, the *holder*); nothing mounted in it is
  ever visible on the host, and it vanishes with its last process.
- Inside it, an overlayfs whose lower layer is the host's ``/`` (read
  only, never written) and whose upper layer is a fresh tmpfs: the root
  starts as an exact copy of the host, at no cost and with no download,
  and every write (dpkg's database, /etc, /usr, the apt lists) lands in
  memory and is thrown away.
- Fresh ``/proc``, ``/run`` and ``/tmp``; ``/dev`` and ``/sys`` bound from
  the host.  The network is the host's (the tests' loopback backends are
  reachable, and apt fetches dependencies from the host's sources).
- A ``policy-rc.d`` that allows service actions, so the package's
  maintainer scripts really start and stop the init script.
- gbalance (or the C ``balance``), if the host has it, is purged inside
  the root first.

Commands run with ``nsenter`` into the holder's namespace and root, with a
clean environment (nothing of the caller's leaks in).  Files are read and
written from the host through ``/proc/<holder>/root``.  ``close()`` kills
every process left in the namespace by its pid (daemons the tests
started), then the holder, and removes the temporary directory.

``boot_systemd()`` boots systemd (basic.target only) as pid 1 of its own
pid, mount and network namespaces inside the root, with its own /run,
/tmp, /dev and a cgroup subtree made for it, for tests of the package on
a systemd host; killing it by pid ends everything it started.

Needs root and a kernel with overlayfs; ``create_root()`` says clearly
why when it cannot work.  A command that leaves a process running must
point that process's stdout and stderr away from the captured pipes (as
daemons do), or ``run()`` waits for it.

Typical use::

    with create_root() as root:
        root.install_debs([deb], "gbalance")
        root.write("/etc/balance.conf", "8080 127.0.0.1:8081\n")
        root.run(["/etc/init.d/balance", "start"])
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

#: The environment every command in the root starts with (plus ``env=``).
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "TERM": "dumb",
}

# Mounts the holder makes before it chroots into the overlay.  $1 is the
# temporary directory (a tmpfs is mounted on it, so the upper layer never
# shares a filesystem with the lower one).
_SETUP = r"""
set -eu
w=$1
mount -t tmpfs -o mode=0755 throwaway-root "$w"
mkdir "$w/upper" "$w/work" "$w/root"
mount -t overlay throwaway-root -o "lowerdir=/,upperdir=$w/upper,workdir=$w/work" "$w/root"
r=$w/root
mount -t proc proc "$r/proc"
mount --rbind /dev "$r/dev"
mount --rbind /sys "$r/sys"
mount -t tmpfs -o mode=0755 run "$r/run"
mount -t tmpfs -o mode=1777 tmp "$r/tmp"
mkdir -p "$r/run/lock" "$r/run/shm"
# The host may have /etc/resolv.conf bound from elsewhere: keep its content.
if [ -f /etc/resolv.conf ]; then cat /etc/resolv.conf > "$r/etc/resolv.conf.tmp" && mv "$r/etc/resolv.conf.tmp" "$r/etc/resolv.conf"; fi
printf '#!/bin/sh\nexit 0\n' > "$r/usr/sbin/policy-rc.d"
chmod 755 "$r/usr/sbin/policy-rc.d"
cd "$r"
exec chroot . /bin/sh -c 'echo ready; exec sleep infinity'
"""


class RootError(RuntimeError):
    """The throwaway root could not be made or a command in it failed."""


class ThrowawayRoot:
    """A root made by :func:`create_root`; see the module's docstring."""

    def __init__(self, holder: subprocess.Popen, tmpdir: Path) -> None:
        self._holder = holder
        self._tmpdir = tmpdir
        self.pid = holder.pid
        #: The root as the host sees it (valid while the holder lives).
        self.path = Path(f"/proc/{holder.pid}/root")
        self._ns = os.readlink(f"/proc/{holder.pid}/ns/mnt")
        self._systemds: list[BootedSystemd] = []

    # -- commands ---------------------------------------------------------

    def run(self, cmd: list[str] | str, *, check: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None, input: str | None = None,
            cwd: str = "/") -> subprocess.CompletedProcess:
        """Run ``cmd`` (argv, or a string for ``sh -c``) as root inside the root.

        Text mode; stdout and stderr captured.  ``env`` adds to (or
        overrides) :data:`BASE_ENV`.  With ``check``, a non-zero exit
        raises :class:`RootError` with everything the command printed.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full_env = dict(BASE_ENV, **(env or {}))
        wrapped = ["nsenter", f"--target={self.pid}", "--mount", "--root", "--wd",
                   "--", "/usr/bin/env", "-i", "-C", cwd, *[f"{k}={v}" for k, v in full_env.items()], *argv]
        done = subprocess.run(wrapped, capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if check and done.returncode != 0:
            raise RootError(f"in the throwaway root: {shlex.join(argv)} exited {done.returncode}\n"
                            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
        return done

    def file(self, inside: str) -> Path:
        """The host path of ``inside`` (an absolute path in the root)."""
        return self.path / inside.lstrip("/")

    def write(self, inside: str, data: str | bytes, mode: int = 0o644) -> Path:
        p = self.file(inside)
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        p.write_bytes(data)
        p.chmod(mode)
        return p

    def read(self, inside: str) -> str:
        return self.file(inside).read_text()

    # -- packages ---------------------------------------------------------

    def installed(self) -> dict[str, str]:
        """Package -> version of every package dpkg in the root calls installed."""
        out = self.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Package} ${Version}\n"]).stdout
        return {f[1]: f[2] for f in (line.split() for line in out.splitlines()) if f and f[0] == "ii"}

    def add_apt_repo(self, debs: list[Path], name: str = "gbalance-test") -> str:
        """A flat apt repository of ``debs`` at /srv/<name> in the root, in its sources.

        Only this repository's index is fetched (``apt-get update`` of the
        other sources is skipped: the host's lists are already in the root).
        Returns the sources.list line.
        """
        repo = f"/srv/{name}"
        target = self.file(repo)
        target.mkdir(parents=True, exist_ok=True)
        for deb in debs:
            shutil.copy(deb, target / Path(deb).name)
        self.run(f"cd {repo} && apt-ftparchive packages . > Packages && "
                 f"apt-ftparchive release . > Release.tmp && mv Release.tmp Release")
        line = f"deb [trusted=yes] file:{repo} ./"
        src = f"/etc/apt/sources.list.d/{name}.list"
        self.write(src, line + "\n")
        self.run(["apt-get", "update", "-qq", "-o", f"Dir::Etc::sourcelist={src}", "-o", "Dir::Etc::sourceparts=-",
                  "-o", "APT::Get::List-Cleanup=0"], timeout=300)
        return line

    def apt_install(self, *packages: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """``apt-get install -y`` in the root (dependencies from the host's sources)."""
        return self.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], timeout=timeout)

    def install_debs(self, debs: list[Path], *packages: str) -> subprocess.CompletedProcess:
        """Put ``debs`` in a local apt repository in the root and apt-install ``packages`` from it."""
        self.add_apt_repo(debs)
        return self.apt_install(*packages)

    def purge(self, *packages: str) -> None:
        """Purge every one of ``packages`` the root has installed (none: nothing)."""
        present = [p for p in packages if p in self.installed()]
        if present:
            self.run(["dpkg", "--purge", *present], timeout=300)

    # -- processes --------------------------------------------------------

    def processes(self) -> list[int]:
        """Pids of every process in the root's mount namespace, except the holder."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.pid:
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == self._ns:
                    pids.append(int(entry))
            except OSError:
                continue
        return pids

    def kill_processes(self, grace: float = 5.0) -> list[int]:
        """SIGTERM, then SIGKILL, each process left in the root, by pid.  Returns them."""
        pids = self.processes()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.05)
        return pids

    def close(self) -> None:
        """Kill what runs in the root (by pid), then the holder; drop everything."""
        for booted in self._systemds:   # their own namespaces: not in processes()
            booted.close()
        if self._holder.poll() is None:
            self.kill_processes()
            self._holder.kill()
            self._holder.wait(timeout=30)
        # The tmpfs was mounted in the (now gone) namespace only: the
        # directory on the host is empty.
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def boot_systemd(self, timeout: float = 60) -> BootedSystemd:
        """Boot systemd (basic.target) in the root, in its own pid and network namespaces."""
        booted = BootedSystemd(self, timeout)
        self._systemds.append(booted)
        return booted

    def __enter__(self) -> "ThrowawayRoot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Run by boot_systemd() inside the root: own pid, mount and network
# namespaces (so whatever systemd starts listens nowhere but there), a
# private /run, loopback up, then systemd as pid 1 of the namespace.
_BOOT = r"""
set -eu
for h in systemd unified; do echo $$ > "/sys/fs/cgroup/$h/$1/cgroup.procs"; done
exec unshare --pid --fork --mount-proc --net --propagation private sh -c '
set -eu
# Nothing systemd mounts, remounts or cleans may reach a filesystem the
# host (or the rest of the root) shares: its own /run, /tmp, /dev and
# cgroup tree (its two cgroups bound in, as systemd-nspawn does).
for d in /run /tmp; do mount -t tmpfs -o mode=0755 boot "$d"; done
chmod 1777 /tmp
mkdir -p /run/lock /run/host/dev /run/host/cg
mount --rbind /dev /run/host/dev
mount -t tmpfs -o mode=0755 dev /dev
for n in null zero full random urandom tty; do touch "/dev/$n"; mount --bind "/run/host/dev/$n" "/dev/$n"; done
mkdir /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777 shm /dev/shm
umount -l /run/host/dev
mount --rbind /sys/fs/cgroup /run/host/cg
mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup
mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount --bind "/run/host/cg/systemd/$1" /sys/fs/cgroup/systemd
mount --bind "/run/host/cg/unified/$1" /sys/fs/cgroup/unified
umount -l /run/host/cg
ip link set lo up
exec env -i container=gbalance-test PATH=/usr/sbin:/usr/bin:/sbin:/bin /lib/systemd/systemd --unit=basic.target --log-target=console --log-level=warning
' sh "$1"
"""


def _cgroup_pids(top: Path) -> list[int]:
    """The processes in ``top`` and its sub-cgroups.  systemd creates and
    removes units' cgroups while it boots: one gone between listing and
    reading is skipped."""
    pids = []
    for d, _dirs, _files in os.walk(top):        # os.walk skips a directory that vanished
        try:
            pids.extend(int(p) for p in Path(d, "cgroup.procs").read_text().split())
        except OSError:
            continue
    return pids


class BootedSystemd:
    """systemd running as pid 1 of its own namespaces inside a throwaway root.

    Only basic.target is booted (services of the host's multi-user.target,
    web servers and the like, stay down); the network namespace is private,
    with loopback only.  Commands run with :meth:`run`, in all of systemd's
    namespaces (so ``systemctl`` talks to it).  :meth:`close` kills systemd
    by its pid, which ends every process of its pid namespace, and removes
    the cgroups made for it.
    """

    def __init__(self, root: "ThrowawayRoot", timeout: float = 60) -> None:
        self.root = root
        self.cgroup = f"gbalance-test-{root.pid}-{time.monotonic_ns()}"
        self._cgroup_dirs = [Path(f"/sys/fs/cgroup/{h}/{self.cgroup}") for h in ("systemd", "unified")]
        for d in self._cgroup_dirs:
            d.mkdir()
        log = open(root.file("/root/systemd-boot.log"), "w")
        self._starter = subprocess.Popen(
            ["nsenter", f"--target={root.pid}", "--mount", "--root", "--wd", "--", "/bin/sh", "-c", _BOOT, "sh",
             self.cgroup], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        log.close()
        self.pid = 0
        self.state = ""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and self._starter.poll() is None:
                # systemd moves itself into init.scope below our cgroup.
                for pid in _cgroup_pids(self._cgroup_dirs[0]):
                    if _comm(pid) == "systemd" and self._is_ns_init(pid):
                        self.pid = pid
                if self.pid:
                    state = self.run(["systemctl", "is-system-running"], check=False,
                                     timeout=timeout).stdout.strip()
                    if state in ("running", "degraded"):
                        return
                    self.state = state
                time.sleep(0.1)
        except BaseException:
            self.close()     # nobody else knows of this systemd yet
            raise
        self.close()
        raise RootError(f"systemd did not boot in the throwaway root (state {self.state or 'unknown'}):\n"
                        + root.read("/root/systemd-boot.log"))

    @staticmethod
    def _is_ns_init(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/status") as f:
                ns = next(line for line in f if line.startswith("NSpid:")).split()
            return ns[-1] == "1"
        except (OSError, StopIteration):
            return False

    def run(self, cmd: list[str] | str, *, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Like :meth:`ThrowawayRoot.run`, in systemd's pid, mount and network namespaces."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full_env = dict(BASE_ENV, **(env or {}))
        wrapped = ["nsenter", f"--target={self.pid}", "--mount", "--pid", "--net", "--root", "--wd", "--",
                   "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in full_env.items()], *argv]
        done = subprocess.run(wrapped, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if check and done.returncode != 0:
            raise RootError(f"under systemd in the throwaway root: {shlex.join(argv)} exited {done.returncode}\n"
                            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
        return done

    def close(self) -> None:
        if self.pid and _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)   # pid 1 of its namespace: all of it ends
        # Whatever is still in its cgroups (systemd not yet found, say), by pid.
        for pid in {p for top in self._cgroup_dirs for p in _cgroup_pids(top)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            self._starter.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._starter.kill()
            self._starter.wait()
        for top in self._cgroup_dirs:
            deadline = time.monotonic() + 10
            while top.exists() and time.monotonic() < deadline:
                for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
                    try:
                        d.rmdir()
                    except OSError:
                        pass
                if top.exists():
                    time.sleep(0.1)

    def __enter__(self) -> "BootedSystemd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def create_root(purge: tuple[str, ...] = ("gbalance", "balance"), timeout: float = 60) -> ThrowawayRoot:
    """Make a throwaway root (see the module docstring) and purge ``purge`` in it."""
    if os.geteuid() != 0:
        raise RootError("a throwaway root needs root (mount namespaces and overlayfs)")
    for tool in ("unshare", "nsenter", "chroot"):
        if shutil.which(tool) is None:
            raise RootError(f"a throwaway root needs {tool} (util-linux, coreutils)")
    tmpdir = Path(tempfile.mkdtemp(prefix="gbalance-root-"))
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", _SETUP, "sh",
                               str(tmpdir)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    line = holder.stdout.readline()   # "ready", or EOF when a mount failed
    if line.strip() != "ready":
        holder.kill()
        err = holder.communicate(timeout=timeout)[1]
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise RootError(f"could not make a throwaway root: {err.strip() or 'holder exited'}")
    root = ThrowawayRoot(holder, tmpdir)
    try:
        # A gbalance (or C balance) installed on the host is not the one
        # under test: gone from the root before anything else happens.
        root.purge(*purge)
    except BaseException:
        root.close()
        raise
    return root
