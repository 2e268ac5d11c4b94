"""Discrete-event simulator that replays per-rank action lists.

Input: for every rank an ordered list of ops ``(name, layer, microbatch)`` (the op names
of the disaggregated engine: attention_forward, dispatch, expert_forward, combine,
residual and their backward/grad counterparts; ``programs.schedule_program_per_rank``
turns the AF-Pipe schedule's action lists into this form), a duration for each op on
each rank, and the dependencies between ops.

Semantics:
- Each rank has a compute lane and a link. Compute ops run one at a time, in list order,
  each once its dependencies have finished. Links are full duplex when ``is_sender``
  says which participants of a transfer send (a sender's outgoing and a receiver's
  incoming direction are busy; a rank may send and receive at once), else half duplex
  (one transfer at a time per rank).
- A transfer op (``is_transfer``) in a rank's list is *posted* when the rank reaches it
  (the previous compute op of the list has finished): with ``blocking=False`` the rank
  goes straight on (asynchronous send/recv), with ``blocking=True`` it waits for the
  transfer to finish. A transfer starts once every rank whose list holds it (senders and
  receivers) has posted it, its dependencies have finished and all those ranks' links
  (in the direction they use) are free; it occupies them for the longest of their
  durations.
- An op is finished when it has finished on every rank that runs it; a transfer's data
  arrives ``latency_fn(op)`` after its links are free.
- Shared cores (``cores``, processor sharing): ranks on one host (``host_of``) share
  its ``cores`` (a float: the capacity, e.g. 1.7 when other load takes a share); while
  n compute ops run on a host each progresses at min(1, cores / n) of its own speed, as
  the OS time-shares one-thread ranks. 4 ranks on 2 cores all computing take twice as
  long; a rank waiting for a transfer takes nothing. None: every rank has its own core.

Output: makespan and per-rank busy intervals; ``draw_timeline`` renders them as a PNG.
A deadlock (ops that can never start) raises ValueError naming each rank's next op.

    from torchtitan_disagmoe.planner.simulate import simulate, draw_timeline
    result = simulate({0: [("attention_forward", 0, 0)]}, lambda op, rank: 1.0)
"""

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

Op = tuple[str, int, int]
"""(op name, layer, micro-batch)."""

TRANSFER_OPS = frozenset({"dispatch", "combine", "residual", "dispatch_grad", "combine_grad", "residual_grad"})
COLLECTIVE_PREFIXES = ("send", "recv", "all_to_all", "p2p", "all_gather", "reduce_scatter", "all_reduce")
DepsFn = Callable[[Op], Iterable[Op]]


def is_transfer(name: str) -> bool:
    return name in TRANSFER_OPS or name.startswith(COLLECTIVE_PREFIXES)


@dataclass(frozen=True)
class Interval:
    rank: int
    op: Op
    start: float
    end: float
    lane: str
    """'compute', 'send', 'recv' (full-duplex links) or 'link' (half duplex)."""


@dataclass
class SimResult:
    makespan: float
    intervals: dict[int, list[Interval]] = field(default_factory=dict)
    finish: dict[Op, float] = field(default_factory=dict)

    def busy_time(self, rank: int, lane: str = "compute") -> float:
        """Busy seconds of one lane (overlapping intervals of a lane cannot occur)."""
        return sum(i.end - i.start for i in self.intervals.get(rank, []) if i.lane == lane)

    def busy_fraction(self, rank: int, lane: str = "compute") -> float:
        return self.busy_time(rank, lane) / self.makespan if self.makespan else 0.0


def _deps_fn(deps: DepsFn | Mapping[Op, Iterable[Op]] | None) -> DepsFn:
    if deps is None:
        return lambda op: ()
    if callable(deps):
        return deps
    return lambda op: deps.get(op, ())


def _participants(programs: Mapping[int, list[Op]]) -> dict[Op, list[int]]:
    out: dict[Op, list[int]] = defaultdict(list)
    for rank, ops in programs.items():
        seen = set()
        for op in ops:
            if op in seen:
                raise ValueError(f"rank {rank}: op {op} appears twice in its list")
            seen.add(op)
            out[op].append(rank)
    return out


def simulate(program_per_rank: Mapping[int, list[Op]], duration_fn: Callable[[Op, int], float],
             deps: DepsFn | Mapping[Op, Iterable[Op]] | None = None, blocking: bool = False,
             is_sender: Callable[[Op, int], bool] | None = None,
             latency_fn: Callable[[Op], float] | None = None, cores: int | None = None,
             host_of: Callable[[int], int] | None = None,
             busy_latency_fn: Callable[[Op], float] | None = None, busy_at: int = 2,
             sender_busy_fn: Callable[[Op], float] | None = None,
             cpu_bound_fn: Callable[[Op], bool] | None = None,
             blocked_start_fn: Callable[[Op], float] | None = None) -> SimResult:
    """Replay the lists (module docstring); returns makespan and busy intervals.

    Args:
        program_per_rank: rank -> ordered ops ``(name, layer, microbatch)``.
        duration_fn: ``(op, rank) -> seconds``; a transfer lasts the longest over its ranks.
        deps: ``op -> ops`` it waits for (callable or mapping); None: no dependencies.
        blocking: a posted transfer blocks its rank until it finishes.
        is_sender: ``(transfer op, rank) -> bool``; None: half-duplex links. A string
            names a lane of its own (e.g. collectives on another connection).
        latency_fn: ``transfer op -> seconds`` its data arrives after the link is free
            again (latency delays the consumer, it does not occupy the link); None: 0.
        cores: compute ops that may run at once per host (module docstring); None: no limit.
        host_of: ``rank -> host``; None: all ranks on one host.
        busy_latency_fn: with ``cores``, the latency of a transfer that starts while a
            host of its ranks runs ``busy_at`` or more compute ops (its cores all taken,
            e.g. gloo's threads must wait for one); None: always ``latency_fn``.
        sender_busy_fn: extra latency of a transfer whose sender (``is_sender``) is
            computing when its data would arrive (the rest of the transfer needs the
            sender's communication thread, which may wait for a core beside the
            computing one).
        cpu_bound_fn: with ``cores``, transfers (collectives) whose progress is CPU work
            on every participant (gloo reduces and copies on its own threads): one that
            starts while a host holds k of its participants and n running compute ops
            lasts ``max(1, (k + n) / cores)`` times its duration.
        blocked_start_fn: with ``cores``, seconds a compute op waits off the cores before
            it runs when it starts while ``busy_at`` or more other ranks of its host
            compute (posting a gloo send waits for gloo's thread, which waits for a core).
    """
    if cores is not None and cores <= 0:
        raise ValueError(f"cores = {cores} must be > 0 (or None: no limit)")
    sim = _Simulation(program_per_rank, duration_fn, _deps_fn(deps), blocking, is_sender, latency_fn)
    sim.cores, sim.host_of = cores, host_of or (lambda rank: 0)
    sim.busy_latency_fn, sim.busy_at = busy_latency_fn, busy_at
    sim.sender_busy_fn = sender_busy_fn
    sim.cpu_bound_fn = cpu_bound_fn
    sim.blocked_start_fn = blocked_start_fn
    return sim.run()


class _Simulation:
    def __init__(self, programs, duration_fn, deps_of: DepsFn, blocking: bool, is_sender, latency_fn):
        self.programs = {r: [tuple(op) for op in ops] for r, ops in programs.items()}
        self.duration_fn, self.deps_of, self.blocking, self.is_sender = duration_fn, deps_of, blocking, is_sender
        self.latency_fn = latency_fn or (lambda op: 0.0)
        self.members = _participants(self.programs)
        self.deps = {op: [tuple(d) for d in deps_of(op)] for op in self.members}
        for op, ds in self.deps.items():
            for d in ds:
                if d not in self.members:
                    raise ValueError(f"op {op} depends on {d}, which no rank runs")
        self.pos = {r: 0 for r in self.programs}
        self.busy_until = {r: 0.0 for r in self.programs}  # compute lane
        self.link_until: dict[tuple[int, str], float] = defaultdict(float)
        self.blocked_on: dict[int, Op] = {}
        self.pending_start: dict[int, float] = {}  # rank -> start of an op blocked off the cores
        self.posted: dict[Op, int] = defaultdict(int)
        self.ready_transfers: list[Op] = []  # posted by everyone, not started (FIFO)
        self.ends: dict[Op, list[float]] = defaultdict(list)
        self.events: list[tuple[float, int, Op, tuple[int, ...]]] = []
        self.seq = 0
        self.result = SimResult(0.0, {r: [] for r in self.programs}, {})
        self.cores: float | None = None
        self.host_of: Callable[[int], int] = lambda rank: 0
        # processor sharing: host -> {rank: [op, work left (s at full speed), start]}
        self.active: dict[int, dict[int, list]] = defaultdict(dict)
        self.updated: dict[int, float] = defaultdict(float)
        self.version: dict[int, int] = defaultdict(int)
        self.busy_latency_fn: Callable[[Op], float] | None = None
        self.busy_at = 2
        self.sender_busy_fn: Callable[[Op], float] | None = None
        self.cpu_bound_fn: Callable[[Op], bool] | None = None
        self.blocked_start_fn: Callable[[Op], float] | None = None
        self.now = 0.0

    def run(self) -> SimResult:
        now = 0.0
        while True:
            while self._advance_ranks(now) | self._start_transfers(now):
                pass
            if not self.events:
                break
            now = self.events[0][0]
            while self.events and self.events[0][0] == now:
                _, _, op, ranks = heapq.heappop(self.events)
                if op is not None and op[0] == "#ps":
                    self._ps_finished(op, ranks[0], now)
                elif op is not None and op[0] == "#unblock":
                    self._ps_start(op[1:], ranks[0], now)
                elif op is not None and op[0] == "#arrive":
                    self.now = now
                    self._push(op[1:], ranks, now + self._sender_busy(op[1:]))
                elif op is not None:
                    self._finished(op, ranks, now)
        stuck = {r: ops[self.pos[r]] for r, ops in self.programs.items() if self.pos[r] < len(ops)}
        unstarted = [op for op in self.members if op not in self.result.finish]
        if stuck or unstarted:
            raise ValueError(f"schedule deadlocks; next op per rank: {stuck}; "
                             f"unfinished: {unstarted[:8]}")
        self.result.makespan = max(self.result.finish.values(), default=0.0)  # stale events may come later
        return self.result

    def _deps_done(self, op: Op) -> bool:
        return all(d in self.result.finish for d in self.deps[op])

    def _advance_ranks(self, now: float) -> bool:
        """Let every idle rank start its next compute op or post its next transfers."""
        changed = False
        for rank, ops in self.programs.items():
            while (self.pos[rank] < len(ops) and rank not in self.blocked_on
                   and self.busy_until[rank] <= now):
                op = ops[self.pos[rank]]
                if is_transfer(op[0]):
                    self.posted[op] += 1
                    if self.posted[op] == len(self.members[op]):
                        self.ready_transfers.append(op)
                    if self.blocking:
                        self.blocked_on[rank] = op
                elif self._deps_done(op) and self.cores is not None:
                    self.busy_until[rank] = float("inf")
                    blocked = self._blocked_start(op, rank)
                    if blocked > 0:  # off the cores first, then running
                        self.pending_start[rank] = now
                        self._push(("#unblock",) + op, [rank], now + blocked)
                    else:
                        self._ps_start(op, rank, now)
                elif self._deps_done(op):
                    end = now + self._duration(op, [rank])
                    self.busy_until[rank] = end
                    self.result.intervals[rank].append(Interval(rank, op, now, end, "compute"))
                    self._push(op, [rank], end)
                else:
                    break
                self.pos[rank] += 1
                changed = True
        return changed

    # ---- processor sharing ------------------------------------------------------------
    def _ps_start(self, op: Op, rank: int, now: float) -> None:
        host = self.host_of(rank)
        self._ps_advance(host, now)
        start = self.pending_start.pop(rank, now)  # the interval includes a blocked start
        self.active[host][rank] = [op, self._duration(op, [rank]), start]
        self._ps_schedule(host, now)

    def _blocked_start(self, op: Op, rank: int) -> float:
        """``blocked_start_fn(op)`` when ``busy_at`` or more other ranks of the host compute."""
        if self.blocked_start_fn is None:
            return 0.0
        host = self.host_of(rank)
        others = sum(1 for r in self.active[host] if r != rank)
        return float(self.blocked_start_fn(op)) if others >= self.busy_at else 0.0

    def _ps_rate(self, host: int) -> float:
        return min(1.0, self.cores / max(1, len(self.active[host])))

    def _ps_advance(self, host: int, now: float) -> None:
        rate, dt = self._ps_rate(host), now - self.updated[host]
        for entry in self.active[host].values():
            entry[1] -= dt * rate
        self.updated[host] = now

    def _ps_schedule(self, host: int, now: float) -> None:
        """(Re)compute the finish events of the host's running ops; older ones go stale."""
        self.version[host] += 1
        rate = self._ps_rate(host)
        for rank, (_, left, _) in self.active[host].items():
            self._push(("#ps", host, self.version[host]), [rank], now + max(0.0, left) / rate)

    def _ps_finished(self, marker: tuple, rank: int, now: float) -> None:
        _, host, version = marker
        if version != self.version[host]:
            return  # stale: the sharing changed after this event was scheduled
        self._ps_advance(host, now)
        op, _, start = self.active[host].pop(rank)
        self.busy_until[rank] = now
        self.result.intervals[rank].append(Interval(rank, op, start, now, "compute"))
        self._finished(op, (rank,), now)
        self._ps_schedule(host, now)

    def _lane(self, op: Op, rank: int) -> str:
        if self.is_sender is None:
            return "link"
        lane = self.is_sender(op, rank)
        return lane if isinstance(lane, str) else ("send" if lane else "recv")

    def _start_transfers(self, now: float) -> bool:
        started = []
        for op in self.ready_transfers:
            lanes = [(r, self._lane(op, r)) for r in self.members[op]]
            if self._deps_done(op) and all(self.link_until[lane] <= now for lane in lanes):
                end = now + self._duration(op, self.members[op]) * self._cpu_stretch(op)
                for lane in lanes:
                    self.link_until[lane] = end
                    self.result.intervals[lane[0]].append(Interval(lane[0], op, now, end, lane[1]))
                arrival = end + max(0.0, float(self._latency(op)))
                if arrival > end:
                    self._push(None, (), end)  # wake up when the links are free again
                if self.sender_busy_fn is not None:  # decide then whether its sender computes
                    self._push(("#arrive",) + op, self.members[op], arrival)
                else:
                    self._push(op, self.members[op], arrival)
                started.append(op)
        self.ready_transfers = [op for op in self.ready_transfers if op not in started]
        return bool(started)

    def _cpu_stretch(self, op: Op) -> float:
        """How much slower a CPU-bound transfer runs for sharing its hosts' cores
        (``cpu_bound_fn``), from the compute running as it starts."""
        if self.cpu_bound_fn is None or self.cores is None or not self.cpu_bound_fn(op):
            return 1.0
        per_host: dict[int, int] = defaultdict(int)
        for r in self.members[op]:
            per_host[self.host_of(r)] += 1
        return max(max(1.0, (k + len(self.active[h])) / self.cores) for h, k in per_host.items())

    def _latency(self, op: Op) -> float:
        """``busy_latency_fn`` when, as the transfer starts, a host of its ranks has at
        least ``busy_at`` compute ops running (no core free for gloo's threads), else
        ``latency_fn``."""
        if (self.busy_latency_fn is not None and self.cores is not None
                and max(len(self.active[self.host_of(r)]) for r in self.members[op]) >= self.busy_at):
            return self.busy_latency_fn(op)
        return self.latency_fn(op)

    def _sender_busy(self, op: Op) -> float:
        """``sender_busy_fn(op)`` when a sender of ``op`` is computing as its data would
        arrive, else 0."""
        if self.sender_busy_fn is None or self.is_sender is None:
            return 0.0
        for r in self.members[op]:
            busy = (r in self.active[self.host_of(r)]) if self.cores is not None else self.busy_until[r] > self.now
            if self.is_sender(op, r) and busy:
                return float(self.sender_busy_fn(op))
        return 0.0

    def _duration(self, op: Op, ranks: list[int]) -> float:
        duration = max(float(self.duration_fn(op, r)) for r in ranks)
        if duration < 0:
            raise ValueError(f"negative duration {duration} for {op}")
        return duration

    def _push(self, op: Op | None, ranks, end: float) -> None:
        heapq.heappush(self.events, (end, self.seq, op, tuple(ranks)))
        self.seq += 1

    def _finished(self, op: Op, ranks: tuple[int, ...], now: float) -> None:
        self.ends[op] += [now] * len(ranks)
        if len(self.ends[op]) == len(self.members[op]):
            self.result.finish[op] = max(self.ends.pop(op))
        for r in ranks:
            if self.blocked_on.get(r) == op:
                del self.blocked_on[r]


# ---- picture ------------------------------------------------------------------------------
def _kind(name: str) -> str:
    if is_transfer(name):
        return "transfer_grad" if name.endswith("_grad") else "transfer"
    return name


_COLOURS = {
    "attention_forward": "#4C72B0", "attention_backward": "#8FAADC",
    "expert_forward": "#DD8452", "expert_backward": "#F4B183",
    "transfer": "#55A868", "transfer_grad": "#A9D18E",
}


def draw_timeline(result: SimResult, path: str, rank_labels: Mapping[int, str] | None = None,
                  title: str = "") -> None:
    """One row per rank (compute as tall bars, the link as thin bars underneath: sending
    above receiving when links are full duplex), coloured by op kind, micro-batch index
    written in bars that are wide enough."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = sorted(result.intervals)
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.5))
    span = result.makespan or 1.0
    geometry = {"compute": (0.6, -0.05), "link": (0.2, -0.3), "send": (0.12, -0.2), "recv": (0.12, -0.35)}
    bars: dict[tuple[int, str, str], list[tuple[float, float]]] = defaultdict(list)
    for row, rank in enumerate(ranks):
        y = len(ranks) - 1 - row
        for iv in result.intervals[rank]:
            bars[(y, iv.lane, _kind(iv.op[0]))].append((iv.start, iv.end - iv.start))
            height, offset = geometry[iv.lane]
            if iv.lane == "compute" and (iv.end - iv.start) > 0.02 * span:
                ax.text((iv.start + iv.end) / 2, y + offset + height / 2, f"m{iv.op[2]}", ha="center",
                        va="center", fontsize=6)
    kinds_seen = {}
    dense = max((len(v) for v in bars.values()), default=0) > 200  # edges would blacken the bars
    for (y, lane, kind), xranges in bars.items():  # one collection per row, lane and kind: fast
        height, offset = geometry[lane]
        kinds_seen[kind] = colour = _COLOURS.get(kind, "#999999")
        ax.broken_barh(xranges, (y + offset, height), facecolors=colour, edgecolor="black",
                       linewidth=0.0 if dense else 0.2)
    ax.set_yticks(range(len(ranks)))
    labels = rank_labels or {}
    ax.set_yticklabels([labels.get(r, f"rank {r}") for r in reversed(ranks)])
    ax.set_xlabel("time (s)")
    ax.set_xlim(0, span * 1.01)
    ax.set_title(title or f"simulated step: {span:.4g} s")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in kinds_seen.items()], loc="upper center",
              bbox_to_anchor=(0.5, -0.12 - 0.3 / len(ranks)), fontsize=7, ncol=6, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
