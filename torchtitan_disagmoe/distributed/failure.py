"""Failing fast, and saying why: what each rank is doing, heartbeats, and the report a
rank writes when the job dies.

A disaggregated job has more ways to hang than a colocated one: an expert rank that dies
leaves attention ranks waiting for a combine that never comes. Three things keep a
failure short and legible:

- ``Activity``: this rank's current step and action ("forward of F(2), micro-batch 1",
  "waiting for combine of layer 2, micro-batch 1 from ranks [2, 3]"), a Python attribute
  the training loop and the AF-Pipe runtime update (no I/O).
- ``Watchdog``: a daemon thread that publishes the activity as a heartbeat in the job's
  key-value store (torchrun's store, or rank 0's) when it changes and every few seconds,
  and ends the process if the activity has not changed for longer than its deadline (a
  hang that no communication timeout catches: the last line of defence).
- ``failure_report``: on any exception in a step, the rank names itself, its activity and
  the peers it was waiting for, reads the other ranks' heartbeats and names the ranks that
  stopped reporting with what they were last doing.

Every transfer and collective also has a timeout (``comm.*_timeout_seconds``), so a rank
that waits on a dead or stuck peer raises instead of waiting forever. The launcher
(torchrun) sees the non-zero exit and stops the remaining ranks.
"""

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

logger = logging.getLogger("torchtitan_disagmoe")

_KEY = "disagmoe/heartbeat/{}"
EXIT_HANG = 3  # the watchdog's exit code: no progress within the deadline


class TransferError(RuntimeError):
    """A point-to-point transfer or collective failed; ``peers`` are the ranks involved."""

    def __init__(self, what: str, peers: list[int], cause: BaseException):
        self.what, self.peers = what, sorted(set(peers))
        super().__init__(f"{what} (peers {self.peers}) failed: {_first_line(cause)}")


class TrainingFailure(RuntimeError):
    """Raised by the trainer after a failed step; the message is the full report."""


def _first_line(e: BaseException) -> str:
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (exception, stack)}
    if isinstance(failures, dict) and failures:
        rank, (cause, _) = next(iter(sorted(failures.items(), key=lambda item: item[0])))
        return f"checkpoint I/O failed on ranks {sorted(failures)}; rank {rank}: {_first_line(cause)}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


@dataclass
class Activity:
    """What this rank is doing now; updated by the training loop and the runtime."""

    rank: int = 0
    role: str = "single process"
    step: int = 0
    what: str = "starting"
    seq: int = 0
    since: float = field(default_factory=time.monotonic)
    in_step: bool = False
    """True inside ``Trainer.train``: only then does the watchdog enforce its deadline."""

    def set(self, what: str) -> None:
        self.what, self.since = what, time.monotonic()
        self.seq += 1

    def describe(self) -> str:
        return f"rank {self.rank} ({self.role})"


class Heartbeats:
    """Each rank's last published activity, in the job's TCP key-value store."""

    def __init__(self, store: dist.Store | None):
        self.store = store

    @classmethod
    def connect(cls, world_size: int, timeout_s: float = 5.0) -> "Heartbeats":
        """A client of the store the ranks rendezvoused on (MASTER_ADDR/PORT); under torchrun
        that store lives in the launcher, so it outlives any rank."""
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world_size == 1 or not addr or not port:
            return cls(None)
        try:
            store = dist.TCPStore(addr, int(port), world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
        except Exception as e:  # heartbeats are diagnostics: never fail the job for them
            logger.warning(f"heartbeats disabled: cannot reach the store at {addr}:{port} ({_first_line(e)})")
            return cls(None)
        return cls(store)

    def publish(self, activity: Activity, failed: bool = False) -> None:
        if self.store is None:
            return
        record = {"t": time.time(), "step": activity.step, "what": activity.what, "role": activity.role,
                  "failed": failed}
        self.store.set(_KEY.format(activity.rank), json.dumps(record))

    def read(self, ranks: list[int]) -> dict[int, dict | None]:
        """Last heartbeat of each rank (None: never published). Raises if the store is
        gone, which happens when its host died (rank 0, without a launcher's store)."""
        out: dict[int, dict | None] = {r: None for r in ranks}
        for r in ranks:
            if self.store.check([_KEY.format(r)]):
                out[r] = json.loads(self.store.get(_KEY.format(r)))
        return out


class Watchdog:
    """Publishes heartbeats; exits the process if the activity is stuck past ``deadline_s``."""

    def __init__(self, activity: Activity, heartbeats: Heartbeats, interval_s: float, deadline_s: float):
        self.activity, self.heartbeats = activity, heartbeats
        self.interval_s, self.deadline_s = interval_s, deadline_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disagmoe-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        if self.interval_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        published_seq, published_at = -1, 0.0
        while not self._stop.wait(self.interval_s):
            a = self.activity
            now = time.monotonic()
            if a.seq != published_seq or now - published_at > 2 * self.interval_s:
                try:
                    self.heartbeats.publish(a)
                except Exception:
                    pass  # store gone: the rank that hosted it died; the transfers will tell
                published_seq, published_at = a.seq, now
            if a.in_step and self.deadline_s > 0 and now - a.since > self.deadline_s:
                report = (f"{a.describe()} made no progress for {now - a.since:.0f} s at step {a.step} while "
                          f"{a.what}; exiting (watchdog deadline {self.deadline_s:.0f} s = "
                          f"comm.train_timeout_seconds + margin). Stacks of all threads follow.")
                logger.error(report)
                import faulthandler
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_HANG)


def failure_report(error: BaseException, activity: Activity, heartbeats: Heartbeats, world_size: int,
                   stale_s: float = 3.0) -> str:
    """One paragraph: who failed, doing what, waiting for whom, and which rank failed first.

    Other ranks are classified from the store: a rank that failed marks its heartbeat
    ``failed``; a rank whose heartbeat is older than ``stale_s`` without that mark was
    killed, crashed hard or hangs: the root cause. A rank killed a moment ago still looks
    fresh, so wait up to ``stale_s`` for one to go stale before blaming the earliest
    reported failure.
    """
    lines = [f"{activity.describe()} failed at step {activity.step} while {activity.what}: {_first_line(error)}"]
    if world_size == 1:
        return lines[0]
    peers = getattr(error, "peers", None) or getattr(error.__cause__, "peers", None) or []
    if peers:
        lines.append(f"Peers of that transfer: ranks {peers}.")
    if heartbeats.store is None:
        lines.append("(no heartbeat store: cannot tell which rank failed first; see every rank's log)")
        return " ".join(lines)
    others = [r for r in range(world_size) if r != activity.rank]
    deadline = time.monotonic() + stale_s
    while True:  # look for a rank that went silent without reporting a failure: the root cause
        try:
            beats = heartbeats.read(others)
        except Exception as e:
            lines.append(f"The heartbeat store is unreachable ({_first_line(e)}); its host (the launcher, or "
                         "rank 0 without one) has probably died.")
            return " ".join(lines)
        failed = {r: b for r, b in beats.items() if b is not None and b.get("failed")}
        silent = {r: b for r, b in beats.items() if r not in failed and (b is None or time.time() - b["t"] > stale_s)}
        if silent or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    causes = []
    for r, beat in sorted(silent.items()):
        role = (beat or {}).get("role", "role unknown")
        if beat is None:
            causes.append(f"rank {r} ({role}) never reported")
        else:
            causes.append(f"rank {r} ({role}) stopped reporting {time.time() - beat['t']:.1f} s ago (killed, "
                          f"crashed or hung), last at step {beat['step']} while {beat['what']}")
    if not causes and failed:  # every rank that stopped said why: the earliest failed first
        r, beat = min(failed.items(), key=lambda item: item[1]["t"])
        causes.append(f"rank {r} ({beat['role']}) failed first, at step {beat['step']} while {beat['what']}")
    if causes:
        lines.append("Likely cause: " + "; ".join(causes) + ".")
    else:
        lines.append("Every other rank was still running: this rank's error is the first failure.")
    return " ".join(lines)
