"""Micro-benchmarks of the AF-Pipe runtime's own mechanisms on this host, for the CPU
calibration (``calibrate.py``, docs/planner.md section 8): what af_pipe's FSDP2 over an
attention group costs per unit (``measure_fsdp_af``), and how late rows arrive when their
sender computes after posting them (``measure_row_transfers``, with the runtime's own
transfer functions).

    from torchtitan_disagmoe.planner.runtime_bench import measure_fsdp_af, measure_row_transfers
    measure_fsdp_af(2)          # per FSDP unit: gather, reduce-scatter, hooks per call
    measure_row_transfers()     # extra wait for rows whose sender computes after posting
"""

import json
import statistics
import time
from pathlib import Path

import torch

from .host_bench import build_model, spawn_for_json


def _fsdp_af_worker(rank: int, port: int, out_file: str, world: int, steps: int, name: str, flavor: str) -> None:
    """``measure_fsdp_af`` on one rank: the model's attention-side stages (``af_stages``),
    2 micro-batches per step, plain and sharded the runtime's way."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan_disagmoe.distributed.af_stages import (
        StageRecord,
        attention_layer_forward,
        head_forward,
        leaf,
    )
    from torchtitan_disagmoe.distributed.disagg_model import shard_attention_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    plain, args = build_model(name, flavor)
    sharded = build_model(name, flavor)[0]
    units = shard_attention_group(sharded, init_device_mesh("cpu", (world,)), args.n_layers)
    L, m, experts = args.n_layers, 2, args.moe.num_experts
    torch.manual_seed(rank)
    tokens = torch.randint(0, args.vocab_size, (m, 2, 128))

    def step(model, units, prefetch=False):  # -> {(kind, stage, mb): seconds}
        times, recs = {}, {}
        if prefetch:  # as AFPipeRuntime: the first stage's gather as the step starts, ...
            for unit in units[0]:
                unit.unshard(async_op=True)
        for mb in range(m):
            x = None
            for layer in range(L + 1):
                rec = recs[(layer, mb)] = StageRecord()
                start = time.perf_counter()
                if prefetch and mb == 0 and layer < L:  # ... the next one's as a stage starts
                    for unit in units[2 * layer + 2]:
                        unit.unshard(async_op=True)
                if layer == 0:
                    x = model.tok_embeddings(tokens[mb])
                else:
                    rec.inputs = [x := leaf(x)]
                if layer == L:
                    rec.outputs = [head_forward(model, x, tokens[mb], 1.0 / m)[0]]
                else:
                    h, rows = attention_layer_forward(model.layers[str(layer)], x, model.rope_cache, 1, experts)
                    rec.outputs = [h] + [t for r in rows or [] for t in (r.x_nD, r.weights_nK)]
                    x = h.detach()
                times[("forward", layer, mb)] = time.perf_counter() - start
        for mb in range(m):
            for layer in reversed(range(L + 1)):
                rec = recs.pop((layer, mb))
                grads = [torch.ones_like(rec.outputs[0])] if layer == L else (
                    [recs_in[layer + 1]] + [torch.randn_like(o) * 1e-3 for o in rec.outputs[1:]])
                for unit in units.get(2 * layer, []):
                    unit.set_requires_gradient_sync(mb == m - 1)
                    unit.set_reshard_after_backward(mb == m - 1)
                start = time.perf_counter()
                rec.backward(grads)
                times[("backward", layer, mb)] = time.perf_counter() - start
                recs_in[layer] = rec.inputs[0].grad if rec.inputs else None
        model.zero_grad(set_to_none=True)
        return times

    recs_in: dict[int, torch.Tensor] = {}
    runs = {"plain": [], "sharded": [], "prefetch": []}
    for i in range(steps + 2):  # alternate, against drift; the first two are warm-up
        for label, model, us in (("plain", plain, {}), ("sharded", sharded, units), ("prefetch", sharded, units)):
            dist.barrier()
            t = step(model, us, label == "prefetch")
            if i >= 2:
                runs[label].append(t)
    med = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()}
    p, s = med["plain"], med["sharded"]
    stages = range(L + 1)
    n_units = sum(len(units.get(2 * layer, [])) for layer in stages)
    gather = sum(s[("forward", l, 0)] - s[("forward", l, 1)] for l in stages)
    pre = med["prefetch"]  # what stays in the first forward when the gather was started earlier
    exposed = sum(pre[("forward", l, 0)] - pre[("forward", l, 1)] for l in stages)
    reduce = sum(s[("backward", l, m - 1)] - s[("backward", l, 0)] for l in stages)
    hooks = sum(s[("forward", l, 1)] - p[("forward", l, 1)] + s[("backward", l, 0)] - p[("backward", l, 0)]
                for l in stages)
    if rank == 0:
        Path(out_file).write_text(json.dumps({"fsdp_af_gather": max(0.0, gather / n_units),
                                              "fsdp_af_reduce": max(0.0, reduce / n_units),
                                              "fsdp_af_hook": max(0.0, hooks / (2 * n_units)),
                                              "fsdp_af_gather_exposed": max(0.0, exposed / n_units)}))
    dist.destroy_process_group()


def measure_fsdp_af(world: int = 2, steps: int = 12, name: str = "qwen3_moe", flavor: str = "debug") -> dict:
    """What af_pipe's FSDP2 over an attention group of ``world`` ranks costs, per FSDP
    unit (``disagg_model.shard_attention_group``: one unit per module the runtime calls),
    measured on the model's own attention-side stages in ``world`` spawned processes
    (1 thread each), 2 micro-batches per step, stage by stage as the runtime runs them,
    against the same stages unsharded: ``fsdp_af_gather`` (the first forward of a stage in
    a step over its second: the all-gather), ``fsdp_af_reduce`` (the last backward over
    the first: the reduce-scatter) and ``fsdp_af_hook`` (FSDP2's hooks in every other
    forward or backward, per call) and ``fsdp_af_gather_exposed`` (what is left of the
    all-gather in the first forward when it was started, async, as the previous stage
    started: the runtime's prefetch since commit 509c946). Medians over ``steps`` steps."""
    return spawn_for_json(_fsdp_af_worker, world, world, steps, name, flavor)


def _row_transfer_worker(rank: int, port: int, out_file: str, reps: int, dim: int) -> None:
    """``measure_row_transfers`` on one of 2 ranks."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    extra = _busy_sender_extra(rank, reps, dim, bounded=True)
    extra_counts_first = _busy_sender_extra(rank, reps, dim, bounded=False)
    if rank == 0:
        Path(out_file).write_text(json.dumps({"busy_sender_extra": extra,
                                              "busy_sender_extra_counts_first": extra_counts_first}))
    dist.destroy_process_group()


def _busy_sender_extra(rank: int, reps: int, dim: int, rows: int = 512, compute_s: float = 0.03,
                       bounded: bool = True) -> float:
    """Rank 1 posts rows with their count (``post_sends``) and computes ``compute_s``;
    rank 0 waits for them (``RowRecv``, posted early): the mean wait over that of the same
    transfer with an idle sender. ``bounded``: the payload receive is posted at once, into
    a buffer of ``rows`` (the runtime on gloo); else only when the count is in, after the
    payload was sent (counts first), so the rest of the transfer needs the sender's gloo
    thread, which then waits for a core beside the sender's computing main thread:
    either at once or after several ms (the scheduler), bimodal."""
    import torch.distributed as dist

    from torchtitan_disagmoe.distributed.dispatch import RowRecv, post_sends

    cpu, a = torch.device("cpu"), torch.randn(256, 256)
    payload = [torch.randn(rows, dim), torch.arange(rows)]
    layout = [((dim,), torch.float32), ((), torch.int64)]
    waits = {0.0: [], compute_s: []}
    for i in range(2 * reps + 2):
        busy = compute_s if i % 2 else 0.0
        tag = 100_000 + 16 * i
        recv = RowRecv([1], layout, tag, cpu, rows if bounded else None) if rank == 0 else None
        dist.barrier()
        if rank == 1:
            sent = post_sends({0: payload}, tag, cpu, True)
            start = time.perf_counter()
            while time.perf_counter() - start < busy:
                a @ a
            sent.wait()
        else:
            start = time.perf_counter()
            recv.wait()
            if i >= 2:
                waits[busy].append(time.perf_counter() - start)
    if rank != 0:
        return 0.0
    return max(0.0, statistics.fmean(waits[compute_s]) - statistics.fmean(waits[0.0]))


def measure_row_transfers(reps: int = 80, dim: int = 128) -> dict:
    """Rows posted and received with the runtime's own functions (``dispatch.py``:
    ``post_sends`` with counts, ``RowRecv``) between 2 spawned processes (1 thread each):
    ``busy_sender_extra``, the mean extra wait of the receiver when the sender computes
    after posting (``_busy_sender_extra``), over ``reps`` transfers of each kind, with
    bounded receives (gloo's protocol) and, as ``busy_sender_extra_counts_first``, with
    counts first (NCCL's)."""
    return spawn_for_json(_row_transfer_worker, 2, reps, dim)
