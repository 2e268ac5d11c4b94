"""Network-namespace plumbing of the cluster in a box: running ``ip``, listing our
namespaces, finding and killing the processes inside them, removing leftovers of runs
that were killed before they could clean up."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

NAME_RE = re.compile(r"^ttd(\d+)(n\d+|r)$")  # namespaces we create: ttd<pid>n<i>, ttd<pid>r


class ClusterError(RuntimeError):
    pass


class NamespacesUnavailable(ClusterError):
    """Network namespaces cannot be made here (not root, no ``ip``, refused by the kernel)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; raised in the main thread so that teardown runs."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


# ---- namespaces --------------------------------------------------------------------------

def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_netns() -> list[str]:
    if shutil.which("ip") is None:
        return []
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def why_no_namespaces() -> str | None:
    """None when namespaces can probably be made here, else the reason they cannot."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"network namespaces need root (or CAP_NET_ADMIN and CAP_SYS_ADMIN); running as uid {os.geteuid()}"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(ns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(x) for x in out.split() if x.isdigit()]


def _descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), children after parents."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def _kill_pids(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in pids if _pid_alive(p)]
        for p in live:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline and any(_pid_alive(p) and not _is_zombie(p) for p in live):
            time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def cleanup_leftovers(include_live: bool = False, log=print) -> list[str]:
    """Delete namespaces named ttd<pid>n<i> / ttd<pid>r whose creating process is gone.

    ``include_live`` also removes those of running processes (do not use while another
    cluster-in-a-box run is in progress). Returns the names removed.
    """
    removed = []
    for ns in list_netns():
        match = NAME_RE.match(ns)
        if not match:
            continue
        owner = int(match.group(1))
        if owner == os.getpid() or (not include_live and _pid_alive(owner)):
            continue
        _kill_pids(_netns_pids(ns), grace_s=2.0)
        _run(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    if removed:
        log(f"cluster-in-a-box: removed leftover namespaces {' '.join(removed)}")
    return removed
