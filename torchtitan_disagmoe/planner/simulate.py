"""Discrete-event simulator that replays per-rank action lists.

Input: for every rank an ordered list of ops ``(name, layer, microbatch)`` (the tuples of
``af_engine.global_program`` with a micro-batch index; any schedule generator's lists
work, e.g. ``distributed/schedule.py``'s), a duration for each op on each rank, and the
dependencies between ops.

Semantics:
- Each rank has two lanes: compute, and its link. Compute ops run one at a time in list
  order; transfer ops (``is_transfer``) occupy the link lane of *every* rank whose list
  contains the same op (sender and receivers), starting when all of them have reached it,
  and last the longest of their durations.
- A rank issues its ops in list order: an op starts no earlier than the previous op of
  the same list started (``blocking=False``: transfers are asynchronous, compute goes on
  while they run) or finished (``blocking=True``: every op waits for the one before).
- An op starts only after every op it depends on has finished on every rank that runs it.

Output: makespan and per-rank busy intervals; ``draw_timeline`` renders them as a PNG.
Deadlocks (a rank waits on an op that can never start) raise ValueError with each rank's
next op.

    from torchtitan_disagmoe.planner.simulate import simulate, draw_timeline
    result = simulate({0: [("attention_forward", 0, 0)]}, lambda op, rank: 1.0)
"""

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
        for op in self.members:
            for d in deps_of(op):
                if tuple(d) not in self.members:
                    raise ValueError(f"op {op} depends on {tuple(d)}, which no rank runs")
        self.pos = {r: 0 for r in self.programs}
        self.issue = {r: 0.0 for r in self.programs}  # earliest start of the rank's next op
        self.lane_free = {(r, lane): 0.0 for r in self.programs for lane in ("compute", "link")}
        self.ends: dict[Op, list[float]] = defaultdict(list)
        self.result = SimResult(0.0, {r: [] for r in self.programs}, {})

    def run(self) -> SimResult:
        remaining = sum(len(ops) for ops in self.programs.values())
        while remaining:
            progressed = False
            for rank, ops in self.programs.items():
                while self.pos[rank] < len(ops):
                    started = self._try_start(ops[self.pos[rank]], rank)
                    if not started:
                        break
                    for r in started:
                        self.pos[r] += 1
                    remaining -= len(started)
                    progressed = True
            if not progressed:
                stuck = {r: ops[self.pos[r]] for r, ops in self.programs.items() if self.pos[r] < len(ops)}
                raise ValueError(f"schedule deadlocks; next op per rank: {stuck}")
        ivs = [i for rank_ivs in self.result.intervals.values() for i in rank_ivs]
        self.result.makespan = max((i.end for i in ivs), default=0.0)
        return self.result

    def _try_start(self, op: Op, rank: int) -> list[int]:
        """Start ``op`` if its participants have reached it and its dependencies are done;
        returns the ranks it started on (empty: it must wait)."""
        finish = self.result.finish
        ready = 0.0
        for d in self.deps_of(op):
            if tuple(d) not in finish:
                return []
            ready = max(ready, finish[tuple(d)])
        transfer = is_transfer(op[0])
        ranks = self.members[op] if transfer else [rank]
        lane = "link" if transfer else "compute"
        programs, pos = self.programs, self.pos
        if transfer and any(pos[r] >= len(programs[r]) or programs[r][pos[r]] != op for r in ranks):
            return []
        start = max([ready] + [max(self.issue[r], self.lane_free[(r, lane)]) for r in ranks])
        duration = max(self.duration_fn(op, r) for r in ranks)
        if duration < 0:
            raise ValueError(f"negative duration {duration} for {op}")
        end = start + duration
        for r in ranks:
            self.lane_free[(r, lane)] = end
            self.issue[r] = end if self.blocking else start
            self.result.intervals[r].append(Interval(r, op, start, end, lane))
        # An op that several ranks run (e.g. attention_forward on every rank of a group)
        # is finished when the last of them is.
        self.ends[op] += [end] * len(ranks)
        if len(self.ends[op]) == len(self.members[op]):
            finish[op] = max(self.ends.pop(op))
        return ranks


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
