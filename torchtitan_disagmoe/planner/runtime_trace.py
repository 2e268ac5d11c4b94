"""Per-action CPU costs of the AF-Pipe runtime, measured inside real runs of the trainer.

The stage micro-benchmarks (``calibrate.measure_stages``) time the bare stage functions;
inside the runtime each action also builds the stage's input from received rows (the
combine's ``index_add``), keeps records, concatenates and splits rows and posts its
transfers. Measured on this host (5 Dec 2026, A1 F1, one micro-batch), the runtime's
actions cost 5-28% more CPU than the bare functions at the same tokens. So the
calibration also runs the trainer itself: af_pipe with one micro-batch (the two pools
take turns, so no rank shares a core with another's compute) in the layouts of
``TRACE_LAYOUTS`` at the global batches of ``TRACE_BATCHES``, and reads every action's
CPU time from the runtime's own timeline (``AFPipeRuntime`` trace: the main thread's
``time.thread_time`` per action, which leaves out waiting for transfers and for a core).

Kept like the stage micro-benchmarks, as points plus a line per kind (``Linear``):
attention and head forward / backward (x = tokens, per expert-parallel degree), expert
stages (x = routed copies expected under uniform routing, per number of local experts)
and the posting of each transfer (x = rows the post handles over all its peers).

FSDP2 over an attention group is measured the same way in A2 F1 (``FSDP_LAYOUT``) at
``FSDP_BATCHES``: per unit, what its collectives hold and what CPU it adds to a stage's
first forward and last backward (``fsdp_costs``).

The validation grid (``cpu_predict.AF_GRID``) runs global batch 8; the calibration runs
batches 1-6, so no validation run is part of the calibration.

    from torchtitan_disagmoe.planner.runtime_trace import measure_runtime_actions
    measure_runtime_actions()   # ~1.5 minutes: 10 short runs of the trainer under torchrun
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from math import comb
from pathlib import Path

import torch

from torchtitan_disagmoe.distributed.disagg_model import attention_units

from .calibrate import Linear, StageFits, fit_points
from .host_bench import free_port

TRACE_LAYOUTS = ((1, 1), (1, 2))
"""(attention ranks, expert ranks): expert-parallel degree 1 and 2, 8 and 4 local experts."""
TRACE_BATCHES = (1, 2, 4, 6)
"""Global batch (sequences of 128 tokens) of the calibration runs."""
FSDP_LAYOUT, FSDP_BATCHES = (2, 1), (2, 4)
"""The run for af_pipe's FSDP2 (2 attention ranks: one group of 2) and its global batches."""
ROOT = Path(__file__).resolve().parents[2]


def run_trainer(world: int, overrides: dict, config_file: str, dump: str) -> list[dict]:
    """Run ``torchtitan_disagmoe.train`` on ``world`` local gloo ranks (torchrun) with
    ``--key value`` overrides; returns its metrics.jsonl rows. Raises with the job's
    stderr when it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-port", str(free_port()), "-m", "torchtitan_disagmoe.train", "--job.config_file", config_file,
           "--job.dump_folder", dump] + [x for k, v in overrides.items() for x in (f"--{k}", str(v))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (Path(dump) / "metrics.jsonl").read_text().splitlines()]


def expected_rows(tokens: float, num_experts: int, top_k: int, ep: int) -> float:
    """Rows (token, expert rank) one attention rank sends one expert rank, under uniform
    routing: a token goes to a rank when one of its top-k experts lives there."""
    e = num_experts
    return tokens * (1 - comb(e - e // ep, top_k) / comb(e, top_k))


POSTS = {  # (pool, runtime action) -> the simulator's post op (programs.py, cpu_predict.with_post_ops)
    ("attention", "SEND_F"): "post_send_dispatch", ("attention", "RECV_F"): "post_recv_combine",
    ("attention", "SEND_B"): "post_send_combine_grad", ("attention", "RECV_B"): "post_recv_dispatch_grad",
    ("expert", "RECV_F"): "post_recv_dispatch", ("expert", "SEND_F"): "post_send_combine",
    ("expert", "RECV_B"): "post_recv_combine_grad", ("expert", "SEND_B"): "post_send_dispatch_grad",
}


def action_samples(record: dict, tokens: int, ep: int, num_experts: int, top_k: int) -> dict[str, list]:
    """``{key: [(x, cpu seconds)]}`` from one rank's timeline (``save_timeline``) of an
    af_pipe run with one attention rank, p = 1 and one micro-batch of ``tokens``."""
    num_layers, pool = record["num_layers"], record["pool"]
    rows = expected_rows(tokens, num_experts, top_k, ep)
    out: dict[str, list] = defaultdict(list)
    for name, stage, _, _, _, _, cpu in record["events"]:
        if name in ("FORWARD", "FULL_BACKWARD"):
            direction = "forward" if name == "FORWARD" else "backward"
            if stage == 2 * num_layers:
                out[f"head_{direction}"].append((tokens, cpu))
            elif pool == "attention":
                out[f"attention_{direction}/{ep}"].append((tokens, cpu))
            else:
                out[f"expert_{direction}/{num_experts // ep}"].append((tokens * top_k / ep, cpu))
        elif (pool, name) in POSTS:
            stage_layer = stage // 2
            if pool == "attention" and ((name in ("SEND_F", "RECV_B") and stage_layer == num_layers)
                                        or (name in ("RECV_F", "SEND_B") and stage_layer == 0)):
                continue  # the head sends no dispatch; layer 0 receives no combine
            out[POSTS[(pool, name)]].append((rows * (ep if pool == "attention" else 1), cpu))
    return out


def fsdp_costs(records: list[dict], units: dict[int, int], stages: StageFits, tokens: int,
               ep: int = 1) -> dict[str, list[float]]:
    """Per unit, what FSDP2 adds to each A-stage of an af_pipe run with one micro-batch of
    ``tokens`` and FSDP2 over one group, from the ranks' timelines:

    - ``fsdp_af_gather_exposed`` / ``fsdp_af_reduce``: the time its collectives held the
      stage's first forward (the gather its prefetch did not hide) and last backward (the
      reduce-scatter): wall minus transfer waits minus CPU, on the group rank that was
      held least (the other one also waited for its peer to arrive);
    - ``fsdp_af_forward_cpu`` / ``fsdp_af_backward_cpu``: the CPU of that forward and
      backward beyond the same action without FSDP2 (``stages``, fitted from the runs
      without it): hooks, copying gathered weights out and gradients in; mean of the ranks.

    ``units``: A-stage -> FSDP2 units (``disagg_model.attention_units``)."""
    num_layers = next(r["num_layers"] for r in records)
    held: dict[tuple[str, int], list[float]] = defaultdict(list)
    extra_cpu: dict[tuple[str, int], list[float]] = defaultdict(list)
    for record in records:
        if record["pool"] != "attention":
            continue
        for name, stage, mb, start, end, waited, cpu in record["events"]:
            if name in ("FORWARD", "FULL_BACKWARD") and stage in units and mb == 0:
                held[(name, stage)].append(max(0.0, end - start - waited - cpu) / units[stage])
                direction = "forward" if name == "FORWARD" else "backward"
                fit = (getattr(stages, f"head_{direction}") if stage == 2 * num_layers
                       else getattr(stages, f"attention_{direction}")[ep])
                extra_cpu[(name, stage)].append((cpu - fit(tokens)) / units[stage])
    out: dict[str, list[float]] = defaultdict(list)
    for (name, stage), values in held.items():
        forward = name == "FORWARD"
        out["fsdp_af_gather_exposed" if forward else "fsdp_af_reduce"].append(min(values))
        cpu = statistics.fmean(extra_cpu[(name, stage)])
        out["fsdp_af_forward_cpu" if forward else "fsdp_af_backward_cpu"].append(max(0.0, cpu))
    return dict(out)


def fit_samples(samples: dict[str, list]) -> tuple[StageFits, dict[str, Linear]]:
    """Per key, the median CPU time at each x, then ``fit_points``: stage fits in the
    layout of ``measure_stages`` and post fits by post op name."""
    fits, posts = StageFits("runtime"), {}
    for key, points in samples.items():
        by_x: dict[float, list] = defaultdict(list)
        for x, y in points:
            by_x[round(x, 3)].append(y)
        xs = sorted(by_x)
        fit = fit_points(xs, [statistics.median(by_x[x]) for x in xs]) if len(xs) > 1 else Linear(0.0, 0.0)
        kind, _, sub = key.partition("/")
        if kind.startswith("post_"):
            posts[kind] = fit
        elif sub:
            getattr(fits, kind)[int(sub)] = fit
        else:
            setattr(fits, kind, fit)
    return fits, posts


def measure_runtime_actions(config_file: str = "train_configs/debug_model.toml", steps: int = 8,
                            layouts=TRACE_LAYOUTS, batches=TRACE_BATCHES, seq_len: int = 128) -> dict:
    """Run the calibration jobs (module docstring) and fit their actions' CPU times;
    returns ``{"stages": StageFits json, "posts": {op: Linear json}, "fsdp": per-unit
    FSDP2 seconds (``fsdp_costs``, medians over stages and batches)}``. The traced step
    is the last of ``steps`` (earlier ones warm up)."""
    from torchtitan_disagmoe.config.manager import load_job_config
    from torchtitan_disagmoe.models import get_model_spec

    job = load_job_config(["--job.config_file", str(ROOT / config_file)])
    spec = get_model_spec(job.model.name)
    args = spec.get_flavor(job.model.flavor)
    moe = args.moe
    with torch.device("meta"):
        units = {stage: len(u) for stage, u in attention_units(spec.model_cls(args), args.n_layers).items()}
    samples: dict[str, list] = defaultdict(list)
    for a, f in layouts:
        for batch in batches:
            for record in _traced_run(a, f, batch, seq_len, steps, config_file):
                for key, points in action_samples(record, batch * seq_len, f, moe.num_experts,
                                                  moe.top_k).items():
                    samples[key] += points
    stages, posts = fit_samples(samples)
    fsdp: dict[str, list[float]] = defaultdict(list)
    a, f = FSDP_LAYOUT
    for batch in FSDP_BATCHES:
        records = _traced_run(a, f, batch // a, seq_len, steps, config_file)
        for key, values in fsdp_costs(records, units, stages, batch // a * seq_len, ep=f).items():
            fsdp[key] += values
    return {"stages": stages.to_json(), "posts": {k: v.__dict__ for k, v in posts.items()},
            "fsdp": {k: statistics.median(v) for k, v in fsdp.items() if v}}


def _traced_run(a: int, f: int, local_batch: int, seq_len: int, steps: int, config_file: str) -> list[dict]:
    """Every rank's timeline (``save_timeline``) of the last step of an af_pipe run with
    one micro-batch and p = 1."""
    overrides = {"disagmoe.mode": "af_pipe", "disagmoe.attention_ranks": a, "disagmoe.expert_ranks": f,
                 "disagmoe.pipeline_depth": 1, "disagmoe.microbatches": 1, "training.local_batch_size": local_batch,
                 "training.seq_len": seq_len, "training.steps": steps, "checkpoint.enable": "false",
                 "metrics.enable_tensorboard": "false", "metrics.log_freq": steps, "metrics.timeline_step": steps}
    with tempfile.TemporaryDirectory() as dump:
        run_trainer(a + f, overrides, config_file, dump)
        return [json.loads(p.read_text()) for p in sorted((Path(dump) / "timeline").glob("rank*.json"))]
