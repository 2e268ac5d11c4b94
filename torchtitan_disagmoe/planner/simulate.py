"""Discrete-event simulator that replays per-rank action lists.

Input: for every rank an ordered list of ops ``(name, layer, microbatch)`` (the op names
of the disaggregated engine: attention_forward, dispatch, expert_forward, combine,
residual and their backward/grad counterparts; ``programs.schedule_program_per_rank``
turns the AF-Pipe schedule's action lists into this form), a duration for each op on
each rank, and the dependencies between ops.

Semantics:
- Each rank has a compute lane and a link. Compute ops run one at a time, in list order,
  each once its dependencies have finished.
- A transfer op (``is_transfer``) in a rank's list is *posted* when the rank reaches it
  (the previous compute op of the list has finished): with ``blocking=False`` the rank
  goes straight on (asynchronous send/recv), with ``blocking=True`` it waits for the
  transfer to finish. A transfer starts once every rank whose list holds it (senders and
  receivers) has posted it, its dependencies have finished and all those ranks' links
  are free; it occupies all their links for the longest of their durations.
- An op is finished when it has finished on every rank that runs it.

Output: makespan and per-rank busy intervals; ``draw_timeline`` renders them as a PNG.
A deadlock (ops that can never start) raises ValueError naming each rank's next op.

    from torchtitan_disagmoe.planner.simulate import simulate, draw_timeline
    result = simulate({0: [("attention_forward", 0, 0)]}, lambda op, rank: 1.0)
"""

import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

Op = tuple[str, int, int]
"""(op name, layer, micro-batch)."""

TRANSFER_OPS = frozenset({"dispatch", "combine", "residual", "dispatch_grad", "combine_grad", "residual_grad"})
DepsFn = Callable[[Op], Iterable[Op]]


def is_transfer(name: str) -> bool:
    return name in TRANSFER_OPS or name.startswith(("send", "recv", "all_to_all", "p2p"))


@dataclass(frozen=True)
class Interval:
    rank: int
    op: Op
    start: float
    end: float
    lane: str
    """'compute' or 'link'."""


@dataclass
class SimResult:
    makespan: float
    intervals: dict[int, list[Interval]] = field(default_factory=dict)
    finish: dict[Op, float] = field(default_factory=dict)

    def busy_time(self, rank: int, lane: str = "compute") -> float:
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
             deps: DepsFn | Mapping[Op, Iterable[Op]] | None = None, blocking: bool = False) -> SimResult:
    """Replay the lists (module docstring); returns makespan and busy intervals."""
    return _Simulation(program_per_rank, duration_fn, _deps_fn(deps), blocking).run()


class _Simulation:
    def __init__(self, programs, duration_fn, deps_of: DepsFn, blocking: bool):
        self.programs = {r: [tuple(op) for op in ops] for r, ops in programs.items()}
        self.duration_fn, self.deps_of, self.blocking = duration_fn, deps_of, blocking
        self.members = _participants(self.programs)
        self.deps = {op: [tuple(d) for d in deps_of(op)] for op in self.members}
        for op, ds in self.deps.items():
            for d in ds:
                if d not in self.members:
                    raise ValueError(f"op {op} depends on {d}, which no rank runs")
        self.pos = {r: 0 for r in self.programs}
        self.busy_until = {r: 0.0 for r in self.programs}  # compute lane
        self.link_until = {r: 0.0 for r in self.programs}
        self.blocked_on: dict[int, Op] = {}
        self.posted: dict[Op, int] = defaultdict(int)
        self.ready_transfers: list[Op] = []  # posted by everyone, not started (FIFO)
        self.ends: dict[Op, list[float]] = defaultdict(list)
        self.events: list[tuple[float, int, Op, tuple[int, ...]]] = []
        self.seq = 0
        self.result = SimResult(0.0, {r: [] for r in self.programs}, {})

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
                self._finished(op, ranks, now)
        stuck = {r: ops[self.pos[r]] for r, ops in self.programs.items() if self.pos[r] < len(ops)}
        unstarted = [op for op in self.members if op not in self.result.finish]
        if stuck or unstarted:
            raise ValueError(f"schedule deadlocks; next op per rank: {stuck}; "
                             f"unfinished: {unstarted[:8]}")
        self.result.makespan = now
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
                elif self._deps_done(op):
                    end = now + self._duration(op, [rank])
                    self.busy_until[rank] = end
                    self._record(op, [rank], now, end, "compute")
                else:
                    break
                self.pos[rank] += 1
                changed = True
        return changed

    def _start_transfers(self, now: float) -> bool:
        started = []
        for op in self.ready_transfers:
            ranks = self.members[op]
            if self._deps_done(op) and all(self.link_until[r] <= now for r in ranks):
                end = now + self._duration(op, ranks)
                for r in ranks:
                    self.link_until[r] = end
                self._record(op, ranks, now, end, "link")
                started.append(op)
        self.ready_transfers = [op for op in self.ready_transfers if op not in started]
        return bool(started)

    def _duration(self, op: Op, ranks: list[int]) -> float:
        duration = max(float(self.duration_fn(op, r)) for r in ranks)
        if duration < 0:
            raise ValueError(f"negative duration {duration} for {op}")
        return duration

    def _record(self, op: Op, ranks: list[int], start: float, end: float, lane: str) -> None:
        for r in ranks:
            self.result.intervals[r].append(Interval(r, op, start, end, lane))
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
    """One row per rank (compute as tall bars, link as a thin bar underneath), coloured
    by op kind, micro-batch index written in bars that are wide enough."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = sorted(result.intervals)
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.5))
    span = result.makespan or 1.0
    kinds_seen = {}
    for row, rank in enumerate(ranks):
        y = len(ranks) - 1 - row
        for iv in result.intervals[rank]:
            kind = _kind(iv.op[0])
            colour = _COLOURS.get(kind, "#999999")
            kinds_seen[kind] = colour
            height, base = (0.6, y - 0.05) if iv.lane == "compute" else (0.2, y - 0.3)
            ax.broken_barh([(iv.start, iv.end - iv.start)], (base, height), facecolors=colour,
                           edgecolor="black", linewidth=0.2)
            if iv.lane == "compute" and (iv.end - iv.start) > 0.02 * span:
                ax.text((iv.start + iv.end) / 2, base + height / 2, f"m{iv.op[2]}", ha="center", va="center",
                        fontsize=6)
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
