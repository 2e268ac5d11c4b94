"""Micro-benchmarks of this host for the CPU calibration (``calibrate.py``): gloo between
spawned processes, how many cores concurrent ranks really get, and the trainer's own
per-step work in one process. Each spawns processes and takes seconds to a minute.

    from torchtitan_disagmoe.planner.host_bench import measure_capacity, measure_comm
    measure_comm(2)         # latency, bandwidth, posting cost, collectives, FSDP2 unit cost
    measure_capacity(4)     # cores 4 one-thread ranks share, in units of one rank alone
"""

import contextlib
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


# ---- gloo -----------------------------------------------------------------------------------
def _comm_worker(rank: int, port: int, out_file: str, world: int, reps: int) -> None:
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
    alone = median_time(compute, reps)
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
        return median_time(opt.step, reps)
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


def free_port() -> int:
    """A free local TCP port (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_for_json(worker, nprocs: int, *args) -> dict:
    """Run ``worker(rank, port, out_file, *args)`` on ``nprocs`` spawned processes (a free
    local port for their process group) and return the JSON that rank 0 wrote."""
    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        with _quiet_warnings():
            try:
                mp.spawn(worker, args=(port, out, *args), nprocs=nprocs, join=True)
            except mp.ProcessExitedException:
                # gloo threads can abort a process at exit ("terminate called without an
                # active exception", seen once in measure_fsdp_af): the measurement is
                # complete when rank 0 wrote its result
                if not Path(out).exists():
                    raise
        return json.loads(Path(out).read_text())


def measure_comm(world: int = 2, reps: int = 30) -> dict:
    """gloo costs between ``world`` local processes (1 thread each): ``latency`` (s per
    small message, one way), ``bandwidth`` (B/s), ``post`` (CPU s to post an async batch),
    ``all_reduce`` and ``all_to_all`` (s per small collective over all ``world``)."""
    return spawn_for_json(_comm_worker, world, world, reps)


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
