"""Calibration of the planner on this CPU: time the real stage code and gloo, then fit.

What a step of the debug models costs on a 2-core CPU is dominated by fixed costs (Python
and dispatch per stage, ~1 ms per gloo message), not by FLOPs, so the roofline rates of
``this_machine.py`` alone cannot predict it. This module measures, with one torch thread
(what each rank gets when ranks >= cores):

- ``measure_stages``: the runtime's own stage functions (``af_stages``) in one process,
  forward and backward, at several token counts, each fitted as ``a + b * x``
  (``Linear``): attention layer (x = tokens, per expert-parallel degree: the dispatch
  split loops over expert ranks), head (x = tokens), experts (x = routed copies, per
  number of local experts), the optimizer step (x = parameters: zero_grad, the
  gradient-norm pass, AdamW).
- ``measure_comm``: gloo between ``world`` spawned processes (1 thread each): per-message
  latency and bandwidth of point-to-point ping-pong, the CPU time of posting an
  asynchronous batch of sends, and the latency of a small all_reduce / all_to_all.

The fits are cached as JSON next to ``this_machine.json``; ``cpu_predict.py`` turns them
into step-time predictions through the simulator.

    python -m torchtitan_disagmoe.planner.calibrate [--refresh]   # measure, print the fits
"""

import contextlib
import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

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
        lin = lambda v: Linear(**v)  # noqa: E731
        per = lambda m: {int(k): lin(v) for k, v in m.items()}  # noqa: E731
        return StageFits(d["model"], per(d["attention_forward"]), per(d["attention_backward"]),
                         lin(d["head_forward"]), lin(d["head_backward"]), per(d["expert_forward"]),
                         per(d["expert_backward"]), lin(d["optimizer"]))


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fwd_bwd_times(forward, repeats: int) -> tuple[float, float]:
    """Median forward and backward time of ``forward() -> outputs`` (random output grads)."""
    fwd, bwd = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        outs = [o for o in forward() if o.requires_grad]
        mid = time.perf_counter()
        grads = [torch.randn_like(o) for o in outs]
        start_bwd = time.perf_counter()
        torch.autograd.backward(outs, grads)
        end = time.perf_counter()
        if i:  # the first is a warm-up
            fwd.append(mid - start)
            bwd.append(end - start_bwd)
    return min(fwd), min(bwd)  # the stage's own cost: other load only ever adds to it


def build_model(name: str, flavor: str, seed: int = 0):
    """The full model on CPU, initialised as the trainer does."""
    from torchtitan_disagmoe.models import get_model_spec
    from torchtitan_disagmoe.models.init import init_model_weights_

    spec = get_model_spec(name)
    args = spec.get_flavor(flavor)
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to_empty(device="cpu")
    init_model_weights_(model, lambda n: spec.init_rule(n, args.dim), seed)
    return model, args


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
    from torchtitan_disagmoe.distributed.af_stages import attention_layer_forward, head_forward, leaf, \
        run_local_experts
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

        for tokens in token_counts:
            batch = max(1, tokens // seq_len)
            x = torch.randn(batch, seq_len, args.dim)
            for ep in eps:
                f, b = _fwd_bwd_times(lambda: _attention_outputs(block, leaf(x), model.rope_cache, ep,
                                                                 args.moe.num_experts // ep,
                                                                 attention_layer_forward), repeats)
                add(f"attention_forward/{ep}", tokens, f)
                add(f"attention_backward/{ep}", tokens, b)
            labels = torch.randint(0, args.vocab_size, (batch, seq_len))
            f, b = _fwd_bwd_times(lambda: [head_forward(model, leaf(x), labels, 1.0)[0]], repeats)
            add("head_forward", tokens, f)
            add("head_backward", tokens, b)
            for ep in expert_eps:
                e = args.moe.num_experts // ep
                experts = GroupedExperts(args.dim, args.moe_inter_dim, e)
                for w in (experts.w1, experts.w2, experts.w3):
                    torch.nn.init.normal_(w, std=0.02)
                x_MD, w_MK, ids_MK, copies = _random_routing_rows(tokens, args.moe.num_experts,
                                                                  args.moe.top_k, ep, args.dim)
                f, b = _fwd_bwd_times(lambda: [run_local_experts(experts, leaf(x_MD), leaf(w_MK), ids_MK)],
                                      repeats)
                add(f"expert_forward/{e}", copies, f)
                add(f"expert_backward/{e}", copies, b)
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

        def step():
            norm = torch.stack([p.grad.norm() for p in part]).norm()
            torch.nn.utils.clip_grads_with_norm_(part, 1.0, norm)
            opt.step()
        xs.append(sum(p.numel() for p in part))
        ys.append(_median_time(step, repeats))
    for p in params:
        p.grad = None
    return fit_linear(xs, ys)


# ---- gloo -----------------------------------------------------------------------------------
def _comm_worker(rank: int, world: int, port: int, out_file: str, reps: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res = {}
    for label, numel in (("small", 1), ("large", 2**20)):  # 4 MiB
        t = torch.zeros(numel)
        dist.barrier()
        times = []
        for _ in range(reps):  # ping-pong as the runtime sends: async batches, then wait
            start = time.perf_counter()
            if rank in (0, 1):
                for op in ((dist.isend, dist.irecv) if rank == 0 else (dist.irecv, dist.isend)):
                    for w in dist.batch_isend_irecv([dist.P2POp(op, t, 1 - rank)]):
                        w.wait()
            times.append((time.perf_counter() - start) / 2)
        res[label] = statistics.median(times)
    res["loaded_latency"] = _loaded_latency(rank, world, reps)
    ts = [torch.zeros(2**14) for _ in range(3)]  # posting cost of an async batch (3 payloads + count)
    dist.barrier()
    post = []
    for i in range(reps):
        if rank == 0:
            start = time.perf_counter()
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, 1, tag=4 * i + j) for j, t in enumerate(ts)]
                                           + [dist.P2POp(dist.isend, torch.ones(1), 1, tag=4 * i + 3)])
            post.append(time.perf_counter() - start)
            for w in works:
                w.wait()
        elif rank == 1:
            bufs = [torch.empty_like(t) for t in ts] + [torch.empty(1)]
            for w in dist.batch_isend_irecv([dist.P2POp(dist.irecv, b, 0, tag=4 * i + j) for j, b in enumerate(bufs)]):
                w.wait()
    res["post"] = statistics.median(post) if post else 0.0
    x, y = torch.zeros(world * 16), torch.empty(world * 16)
    colls = {"all_reduce": lambda: dist.all_reduce(x), "all_to_all": lambda: dist.all_to_all_single(y, x),
             "all_gather": lambda: dist.all_gather_into_tensor(y, x[:16]),
             "reduce_scatter": lambda: dist.reduce_scatter_tensor(x[:16], y)}
    for coll, fn in colls.items():
        times = []
        dist.barrier()
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        res[coll] = statistics.median(times)
    res.update(_busy_exchange(rank, reps))
    res["fsdp_unit"], res["fsdp_optimizer_per_tensor"] = _fsdp_unit_overhead(world, reps)
    if rank == 0:
        bw = 2**20 * 4 / max(res["large"] - res["small"], 1e-6)
        Path(out_file).write_text(json.dumps({"latency": res["small"], "bandwidth": bw, **res}))
    dist.destroy_process_group()


def _loaded_latency(rank: int, world: int, reps: int) -> float:
    """One-way latency of a small async message between ranks 0 and 1 while every other
    rank computes (with more ranks than cores, a woken receiver waits for a core)."""
    import torch.distributed as dist

    t = torch.zeros(1)
    dist.barrier()
    if rank >= 2:
        _work(0.4)
        dist.barrier()
        return 0.0
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for op in ((dist.isend, dist.irecv) if rank == 0 else (dist.irecv, dist.isend)):
            for w in dist.batch_isend_irecv([dist.P2POp(op, t, 1 - rank)]):
                w.wait()
        times.append((time.perf_counter() - start) / 2)
    dist.barrier()
    return statistics.median(times)


def _busy_exchange(rank: int, reps: int, numel: int = 2**15) -> dict:
    """Ranks 0 and 1 exchange a 128 KiB message (about one micro-batch's rows) while both
    compute, as in the pipeline: post the async send and receive, compute ~3 ms, wait;
    every other rank computes meanwhile. ``busy_post``: seconds in the posting call;
    ``busy_exchange``: extra wall time per exchange over the same compute without it (what
    a transfer costs when every rank is busy: gloo's threads wait for a core)."""
    import torch.distributed as dist

    a = torch.randn(192, 192)
    x, y = torch.randn(numel), torch.empty(numel)

    def compute():
        for _ in range(20):
            a @ a
    dist.barrier()
    if rank >= 2:
        for _ in range(3 * reps):
            compute()
        dist.barrier()
        return {}
    alone = _median_time(compute, reps)
    posts, totals = [], []
    for i in range(reps):
        start = time.perf_counter()
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, 1 - rank, tag=i),
                                        dist.P2POp(dist.irecv, y, 1 - rank, tag=i)])
        posted = time.perf_counter()
        compute()
        for w in works:
            w.wait()
        posts.append(posted - start)
        totals.append(time.perf_counter() - start)
    dist.barrier()
    return {"busy_post": statistics.median(posts), "busy_exchange": max(0.0, statistics.median(totals) - alone)}


def _fsdp_unit_overhead(world: int, reps: int, units: int = 4, tokens: int = 256) -> float:
    """Extra seconds per FSDP2 unit and step (all-gathers in forward and backward, the
    reduce-scatter, the hooks) on gloo: a stack of ``units`` blocks of 3 Linear(128, 128)
    (about one attention block of the debug models), fully_shard per block and root,
    against the same stack unsharded; and the extra AdamW time per (DTensor) parameter."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def stack():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Sequential(*[nn.Linear(128, 128) for _ in range(3)]) for _ in range(units)])

    x = torch.randn(tokens, 128)
    plain, sharded = stack(), stack()
    mesh = init_device_mesh("cpu", (world,))
    for block in sharded:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)

    def run(model):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            model(x).sum().backward()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    def optimizer(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return _median_time(opt.step, reps)
    n = len(list(plain.parameters()))
    per_tensor = max(0.0, (optimizer(sharded) - optimizer(plain)) / n)
    return max(0.0, (run(sharded) - run(plain)) / (units + 1)), per_tensor


def _work(seconds_hint: float = 0.3) -> float:
    """A fixed single-thread workload like the stages' (small matmuls); its wall time."""
    a = torch.randn(256, 256)
    start = time.perf_counter()
    for _ in range(int(seconds_hint * 2000)):
        a @ a
    return time.perf_counter() - start


def _model_work(model, iterations: int = 4, tokens: int = 512) -> float:
    """The model's own forward + backward (what the ranks run, with its working set:
    weights, activations, logits); its wall time."""
    x = torch.randint(0, model.output.out_features, (tokens // 128, 128))
    start = time.perf_counter()
    for _ in range(iterations):
        model(x).float().logsumexp(-1).mean().backward()
    return time.perf_counter() - start


def _capacity_worker(_: int, start_event, out_queue, name: str, flavor: str) -> None:
    torch.set_num_threads(1)
    model = build_model(name, flavor)[0]
    _model_work(model, 1)
    start_event.wait()
    out_queue.put(_model_work(model))


def measure_capacity(cores: int | None = None, repeats: int = 3, name: str = "qwen3_moe",
                     flavor: str = "debug") -> float:
    """Cores this host gives ``cores`` concurrent one-thread processes, each training the
    model (forward + backward), in units of one process alone (about ``cores`` on an idle
    host; less when other load, shared caches and memory bandwidth or, with more processes
    than cores, context switches take a share). The simulator's ``cores`` for a job of
    that many ranks."""
    import torch.multiprocessing as mp

    cores = cores or os.cpu_count() or 1
    ctx = mp.get_context("spawn")

    def speeds(n: int) -> float:  # summed iterations per second of n concurrent processes
        start, queue = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_capacity_worker, args=(i, start, queue, name, flavor)) for i in range(n)]
        for proc in procs:
            proc.start()
        time.sleep(4.0)  # let them import torch, build the model and warm up
        start.set()
        times = [queue.get() for _ in procs]
        for proc in procs:
            proc.join()
        return sum(1 / t for t in times)
    # alone and together in spawned processes alike (a spawned process is ~10% slower
    # than a long-lived one here), interleaved against drifting load
    return statistics.median(speeds(cores) / speeds(1) for _ in range(repeats)) if cores > 1 else 1.0


@contextlib.contextmanager
def _quiet_warnings():
    """Spawned workers inherit PYTHONWARNINGS: hide torch's deprecation chatter."""
    old = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = "ignore"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONWARNINGS")
        else:
            os.environ["PYTHONWARNINGS"] = old


def measure_comm(world: int = 2, reps: int = 30) -> dict:
    """gloo costs between ``world`` local processes (1 thread each): ``latency`` (s per
    small message, one way), ``bandwidth`` (B/s), ``post`` (CPU s to post an async batch),
    ``all_reduce`` and ``all_to_all`` (s per small collective over all ``world``)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "comm.json")
        with _quiet_warnings():
            mp.spawn(_comm_worker, args=(world, port, out, reps), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


# ---- the trainer's own per-step work, one process ------------------------------------------
def _trainer_worker(_: int, config_file: str, out_file: str, steps: int, batch: int) -> None:
    import tempfile as tf

    from torchtitan_disagmoe.config.manager import load_job_config
    from torchtitan_disagmoe.trainer import Trainer

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key, None)
    with tf.TemporaryDirectory() as dump:
        config = load_job_config(["--job.config_file", config_file, "--job.dump_folder", dump,
                                  "--disagmoe.mode", "colocated", "--training.threads_per_rank", "1",
                                  "--training.local_batch_size", str(batch), "--training.steps", str(steps),
                                  "--checkpoint.enable", "false", "--metrics.enable_tensorboard", "false",
                                  "--metrics.log_freq", "1"])
        trainer = Trainer(config)
        fb_times, inner = [], trainer.forward_backward

        def timed(*a):
            start = time.perf_counter()
            out = inner(*a)
            fb_times.append(time.perf_counter() - start)
            return out
        trainer.forward_backward = timed
        logged = trainer.train()
        trainer.close()
    skip = steps // 3
    total = [r["elapsed_s"] for r in logged][skip:]
    fb = fb_times[skip:]
    Path(out_file).write_text(json.dumps({"step": statistics.median(total), "forward_backward": statistics.median(fb),
                                          "tail": statistics.median(t - f for t, f in zip(total, fb)),
                                          "tokens": batch * config.training.seq_len}))


def measure_trainer(config_file: str = "train_configs/debug_model.toml", steps: int = 12, batch: int = 8) -> dict:
    """One-process training steps (1 thread) of the job file's model: median ``step``,
    ``forward_backward`` (the whole model, T = ``batch`` sequences) and ``tail`` (step -
    forward/backward: data, zero_grad, clipping, optimizer, routing bias, metrics)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "trainer.json")
        with _quiet_warnings():
            mp.spawn(_trainer_worker, args=(config_file, out, steps, batch), nprocs=1, join=True)
        return json.loads(Path(out).read_text())


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
        return {"cores": self.cores, "stages": self.stages.to_json(), "comm": {str(k): v for k, v in self.comm.items()},
                "trainer": self.trainer, "capacity": {str(k): v for k, v in self.capacity.items()}}

    @staticmethod
    def from_json(d: dict) -> "Calibration":
        return Calibration(int(d["cores"]), StageFits.from_json(d["stages"]),
                           {int(k): v for k, v in d["comm"].items()}, d.get("trainer", {}),
                           {int(k): v for k, v in d.get("capacity", {}).items()})


def calibration_file(model: str = "qwen3_moe/debug") -> Path:
    return cache_file().parent / f"calibration_{model.replace('/', '_')}.json"


def calibrate(name: str = "qwen3_moe", flavor: str = "debug", worlds=(2, 3, 4), refresh: bool = False,
              path: Path | None = None, config_file: str = "train_configs/debug_model.toml") -> Calibration:
    """Cached calibration of ``name/flavor`` (measured when absent or ``refresh``)."""
    path = path or calibration_file(f"{name}/{flavor}")
    if path.exists() and not refresh:
        return Calibration.from_json(json.loads(path.read_text()))
    stages = measure_stages(name, flavor)
    trainer = measure_trainer(config_file)
    trainer["params"] = sum(p.numel() for p in build_model(name, flavor)[0].parameters())
    comm = {w: measure_comm(w) for w in worlds}
    cal = Calibration(os.cpu_count() or 1, stages, comm, trainer, {w: measure_capacity(w) for w in worlds})
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
