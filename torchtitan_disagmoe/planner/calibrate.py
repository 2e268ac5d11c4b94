"""Calibration of the planner on this CPU (docs/planner.md section 8).

A step of the debug models on this 2-core CPU costs per-call overheads, gloo messages and
core sharing, not FLOPs, so the roofline rates of ``this_machine.py`` cannot predict it.
With one torch thread (each rank's share when ranks >= cores) this module measures:

- ``measure_stages``: the runtime's own stage functions (``af_stages``) in one process,
  forward and backward, median of 7, all stages and sizes taking turns (as in a step,
  each runs on caches the others filled), at 128-1,024 tokens, kept as points plus a line
  ``a + b x`` (``Linear``): attention layer (x = tokens, per expert-parallel degree: the
  dispatch split loops over expert ranks), head (x = tokens), experts (x = routed copies,
  per number of local experts); the optimizer step (x = parameters).
- from ``runtime_trace.py``: every action's CPU time inside the runtime itself, from
  af_pipe runs of the trainer with one micro-batch at global batches 1-6 (the stage
  functions above plus what the runtime does around them, and the posting of transfers).
- from ``host_bench.py``: the one-process training step (``measure_trainer``), gloo
  between 2-4 spawned processes (``measure_comm``), af_pipe's FSDP2 per unit over an
  attention group of 2 (``measure_fsdp_af``) and the cores that many ranks share
  (``measure_capacity``).

``calibrate()`` caches everything as JSON next to ``this_machine.json``;
``cpu_predict.py`` turns it into step-time predictions through the simulator.

    python -m torchtitan_disagmoe.planner.calibrate [--refresh]   # measure (~4 min), print
"""

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .host_bench import (
    build_model,
    measure_capacity,
    measure_comm,
    measure_trainer,
    median_time,
)
from .runtime_bench import measure_fsdp_af, measure_row_transfers
from .this_machine import cache_file

TOKEN_COUNTS = (128, 256, 512, 1024)


@dataclass
class Linear:
    """seconds = a + b * x; with measured points ``xs``, ``ys`` it interpolates between
    them instead (piecewise linear; beyond them the line's slope from the nearest point):
    stage times on a CPU bend where data leaves the caches (the head's logits at 1,024
    tokens take 3x those at 512), which one line misses."""

    a: float
    b: float
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if len(xs) < 2:
            return max(0.0, self.a + self.b * x)
        if not xs[0] <= x <= xs[-1]:  # beyond the points: the line's slope from the nearest end
            end = 0 if x < xs[0] else -1
            return max(0.0, ys[end] + self.b * (x - xs[end]))
        i = max(j for j in range(len(xs) - 1) if xs[j] <= x)
        return ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])


def fit_linear(xs: list[float], ys: list[float]) -> Linear:
    """Least-squares line through (x, y); the intercept is clamped at >= 0."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need >= 2 points of equal length, got {len(xs)} x and {len(ys)} y")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    if a < 0:  # no negative fixed cost: refit through the origin
        a, b = 0.0, sum(x * y for x, y in zip(xs, ys)) / max(sum(x * x for x in xs), 1e-30)
    return Linear(a, max(b, 0.0))


def fit_points(xs: list[float], ys: list[float]) -> Linear:
    """``fit_linear`` that also keeps the points (sorted) for interpolation."""
    line = fit_linear(xs, ys)
    pts = sorted(zip(xs, ys))
    return Linear(line.a, line.b, [x for x, _ in pts], [y for _, y in pts])


@dataclass
class StageFits:
    """Fitted per-stage times (seconds) of one model on one thread."""

    model: str
    attention_forward: dict[int, Linear] = field(default_factory=dict)
    """expert-parallel degree -> time of one attention layer forward (x = tokens)."""
    attention_backward: dict[int, Linear] = field(default_factory=dict)
    head_forward: Linear = field(default_factory=lambda: Linear(0, 0))
    head_backward: Linear = field(default_factory=lambda: Linear(0, 0))
    expert_forward: dict[int, Linear] = field(default_factory=dict)
    """local experts -> time of one expert stage forward (x = routed copies)."""
    expert_backward: dict[int, Linear] = field(default_factory=dict)
    optimizer: Linear = field(default_factory=lambda: Linear(0, 0))
    """zero_grad + gradient norm + AdamW step (x = parameters)."""

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "StageFits":
        lin = lambda v: Linear(**v)
        per = lambda m: {int(k): lin(v) for k, v in m.items()}
        return StageFits(d["model"], per(d["attention_forward"]), per(d["attention_backward"]),
                         lin(d["head_forward"]), lin(d["head_backward"]), per(d["expert_forward"]),
                         per(d["expert_backward"]), lin(d["optimizer"]))


def _interleaved_times(jobs: list, repeats: int) -> list[tuple[float, float]]:
    """Median forward and backward time of each ``forward() -> outputs`` in ``jobs``
    (random output grads), the jobs taking turns: in a training step each stage runs
    after other stages, on caches they filled (the head at 1,024 tokens takes 1.5-1.8x
    longer after an attention layer than straight after itself), so a stage timed
    back-to-back with itself is too fast."""
    fwd: list[list[float]] = [[] for _ in jobs]
    bwd: list[list[float]] = [[] for _ in jobs]
    for i in range(repeats + 1):
        for j, forward in enumerate(jobs):
            start = time.perf_counter()
            outs = [o for o in forward() if o.requires_grad]
            mid = time.perf_counter()
            grads = [torch.randn_like(o) for o in outs]
            start_bwd = time.perf_counter()
            torch.autograd.backward(outs, grads)
            end = time.perf_counter()
            if i:  # the first round is a warm-up
                fwd[j].append(mid - start)
                bwd[j].append(end - start_bwd)
    return [(statistics.median(f), statistics.median(b)) for f, b in zip(fwd, bwd)]


def _random_routing_rows(tokens: int, num_experts: int, top_k: int, ep: int, dim: int):
    """Rows one expert rank receives for ``tokens`` uniformly routed tokens."""
    ids_TK = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    epr = num_experts // ep
    here_TK = (ids_TK // epr) == 0
    rows = here_TK.any(dim=1).nonzero().squeeze(1)
    local_MK = torch.where(here_TK[rows], ids_TK[rows], -1)
    weights_MK = torch.where(here_TK[rows], torch.rand(len(rows), top_k), 0.0)
    return torch.randn(len(rows), dim), weights_MK, local_MK, int(here_TK.sum())


def measure_stages(name: str = "qwen3_moe", flavor: str = "debug", seq_len: int = 128,
                   token_counts=TOKEN_COUNTS, eps=(1, 2), expert_eps=(1, 2, 4),
                   repeats: int = 7) -> StageFits:
    """Time the runtime's stage functions on one thread and fit each (module docstring)."""
    from torchtitan_disagmoe.distributed.af_stages import (
        attention_layer_forward,
        head_forward,
        leaf,
        run_local_experts,
    )
    from torchtitan_disagmoe.models.moe import GroupedExperts

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model, args = build_model(name, flavor)
        moe_layer = next(i for i in range(args.n_layers) if args.is_moe_layer(i))
        block = model.layers[str(moe_layer)]
        fits = StageFits(f"{name}/{flavor}")
        samples: dict[str, tuple[list, list]] = {}

        def add(key, x, y):
            samples.setdefault(key, ([], []))
            samples[key][0].append(x)
            samples[key][1].append(y)

        jobs = []  # (forward key, backward key, x, forward())
        for tokens in token_counts:
            batch = max(1, tokens // seq_len)
            x = torch.randn(batch, seq_len, args.dim)
            for ep in eps:
                jobs.append((f"attention_forward/{ep}", f"attention_backward/{ep}", tokens,
                             lambda x=x, ep=ep: _attention_outputs(block, leaf(x), model.rope_cache, ep,
                                                                   args.moe.num_experts // ep, attention_layer_forward)))
            labels = torch.randint(0, args.vocab_size, (batch, seq_len))
            jobs.append(("head_forward", "head_backward", tokens,
                         lambda x=x, labels=labels: [head_forward(model, leaf(x), labels, 1.0)[0]]))
            for ep in expert_eps:
                e = args.moe.num_experts // ep
                experts = GroupedExperts(args.dim, args.moe_inter_dim, e)
                for w in (experts.w1, experts.w2, experts.w3):
                    torch.nn.init.normal_(w, std=0.02)
                x_MD, w_MK, ids_MK, copies = _random_routing_rows(tokens, args.moe.num_experts,
                                                                  args.moe.top_k, ep, args.dim)
                jobs.append((f"expert_forward/{e}", f"expert_backward/{e}", copies,
                             lambda e=experts, x=x_MD, w=w_MK, i=ids_MK: [run_local_experts(e, leaf(x), leaf(w), i)]))
        for (key_f, key_b, x, _), (f, b) in zip(jobs, _interleaved_times([j[3] for j in jobs], repeats)):
            add(key_f, x, f)
            add(key_b, x, b)
        for key, (xs, ys) in samples.items():
            kind, _, sub = key.partition("/")
            fit = fit_points(xs, ys)
            if sub:
                getattr(fits, kind)[int(sub)] = fit
            else:
                setattr(fits, kind, fit)
        fits.optimizer = _measure_optimizer(model, repeats)
    finally:
        torch.set_num_threads(threads)
    return fits


def _attention_outputs(block, x, rope_cache, ep, experts_per_rank, attention_layer_forward):
    h, rows = attention_layer_forward(block, x, rope_cache, ep, experts_per_rank)
    return [h] + [t for r in rows for t in (r.x_nD, r.weights_nK)]


def _measure_optimizer(model, repeats: int) -> Linear:
    """zero_grad + per-tensor norm pass + AdamW over growing parts of the model."""
    params = [p for p in model.parameters() if p.requires_grad]
    xs, ys = [], []
    for frac in (0.25, 0.5, 1.0):
        part = params[: max(1, int(len(params) * frac))]
        for p in part:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(part, lr=1e-4)

        def step(part=part, opt=opt):
            norm = torch.stack([p.grad.norm() for p in part]).norm()
            torch.nn.utils.clip_grads_with_norm_(part, 1.0, norm)
            opt.step()
        xs.append(sum(p.numel() for p in part))
        ys.append(median_time(step, repeats))
    for p in params:
        p.grad = None
    return fit_linear(xs, ys)


CALIBRATION_VERSION = 2
"""Bumped when a measurement changes meaning; a cached calibration of another version is
measured again (2: ``busy_sender_extra`` is for bounded row receives, commit 2d4e909,
and the runtime's per-action CPU times, ``runtime_trace.py``, were added)."""


@dataclass
class Calibration:
    """Everything the CPU prediction needs: stage fits, gloo per world size, cores."""

    cores: int
    stages: StageFits
    comm: dict[int, dict] = field(default_factory=dict)
    """world size -> ``measure_comm(world)``."""
    trainer: dict = field(default_factory=dict)
    """``measure_trainer()``: one process's step, forward/backward and tail."""
    capacity: dict[int, float] = field(default_factory=dict)
    """ranks -> ``measure_capacity(ranks)``: the cores that many busy ranks share."""
    runtime: dict = field(default_factory=dict)
    """``runtime_trace.measure_runtime_actions()``: CPU per action inside the runtime."""

    @property
    def runtime_stages(self) -> "StageFits | None":
        return StageFits.from_json(self.runtime["stages"]) if self.runtime else None

    @property
    def runtime_posts(self) -> dict[str, Linear]:
        return {k: Linear(**v) for k, v in self.runtime.get("posts", {}).items()}

    def capacity_for(self, ranks: int) -> float:
        """Measured capacity for ``ranks`` (the nearest measured count), else ``cores``."""
        if not self.capacity:
            return float(self.cores)
        return self.capacity.get(ranks) or self.capacity[min(self.capacity, key=lambda n: abs(n - ranks))]

    @property
    def step_fixed_s(self) -> float:
        """Per-step work outside forward/backward that is not the optimizer's (data,
        zero_grad, metrics): the one-process tail minus its optimizer step."""
        return max(0.0, self.trainer.get("tail", 0.0) - self.stages.optimizer(self.trainer.get("params", 0)))

    def to_json(self) -> dict:
        return {"version": CALIBRATION_VERSION, "cores": self.cores, "stages": self.stages.to_json(), "comm": {str(k): v for k, v in self.comm.items()},
                "trainer": self.trainer, "capacity": {str(k): v for k, v in self.capacity.items()},
                "runtime": self.runtime}

    @staticmethod
    def from_json(d: dict) -> "Calibration":
        return Calibration(int(d["cores"]), StageFits.from_json(d["stages"]),
                           {int(k): v for k, v in d["comm"].items()}, d.get("trainer", {}),
                           {int(k): v for k, v in d.get("capacity", {}).items()}, d.get("runtime", {}))


def calibration_file(model: str = "qwen3_moe/debug") -> Path:
    return cache_file().parent / f"calibration_{model.replace('/', '_')}.json"


def calibrate(name: str = "qwen3_moe", flavor: str = "debug", worlds=(2, 3, 4), refresh: bool = False,
              path: Path | None = None, config_file: str = "train_configs/debug_model.toml") -> Calibration:
    """Cached calibration of ``name/flavor`` (measured when absent or ``refresh``)."""
    path = path or calibration_file(f"{name}/{flavor}")
    if path.exists() and not refresh:
        cached = json.loads(path.read_text())
        if cached.get("version") == CALIBRATION_VERSION:
            return Calibration.from_json(cached)
    stages = measure_stages(name, flavor)
    trainer = measure_trainer(config_file)
    trainer["params"] = sum(p.numel() for p in build_model(name, flavor)[0].parameters())
    comm = {w: measure_comm(w) for w in worlds}
    comm[min(worlds)].update(measure_fsdp_af(min(worlds)))  # the attention groups here have 2 ranks
    comm[min(worlds)].update(measure_row_transfers())
    capacity = {w: measure_capacity(w) for w in worlds}
    from .runtime_trace import measure_runtime_actions  # imports this module
    runtime = measure_runtime_actions(config_file)
    cal = Calibration(os.cpu_count() or 1, stages, comm, trainer, capacity, runtime)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal.to_json(), indent=1))
    return cal


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3_moe")
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--refresh", action="store_true")
    a = parser.parse_args()
    print(json.dumps(calibrate(a.model, a.flavor, refresh=a.refresh).to_json(), indent=1))
