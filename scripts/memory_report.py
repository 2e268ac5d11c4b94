"""Peak memory per pool of the debug model with each composition feature on and off.

Every configuration is a real ``./run_train.sh`` run of the AF-Pipe (attention and expert
pools on disjoint ranks) whose step 2 runs under torch's MemTracker
(``metrics.memory_tracking_step``, components/memory_tracking.py): bytes of parameters,
gradients, optimizer states, activations and temporaries, by category, at the step's peak,
the largest over each pool's ranks. The figures are tensor bytes, not RSS, so they mean the
same on CPU and GPU.

    python scripts/memory_report.py                        # A2 F2, p = 1, 2 micro-batches
    python scripts/memory_report.py --attention 2 --experts 1 --json
    python scripts/memory_report.py --training.seq_len 256 # overrides go to every run

Configurations: ``none`` (replicated attention weights, fp32, no checkpointing), ``fsdp2``
(attention weights sharded over each attention group), ``ac`` (full activation
checkpointing of every A- and F-stage), ``bf16`` (bf16 compute, fp32 master weights:
autocast, since replicated weights have no FSDP2 policy), ``fsdp2_bf16`` (FSDP2's
MixedPrecisionPolicy: bf16 gathers and compute), ``all`` (the three together, plus bf16 dispatch/combine transfers).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FEATURES = {
    "none": {"parallelism.data_parallel_shard_degree": 1},
    "fsdp2": {"parallelism.data_parallel_shard_degree": -1},
    "ac": {"parallelism.data_parallel_shard_degree": 1, "activation_checkpoint.mode": "full"},
    "bf16": {"parallelism.data_parallel_shard_degree": 1, "training.mixed_precision_param": "bfloat16"},
    "fsdp2_bf16": {"parallelism.data_parallel_shard_degree": -1, "training.mixed_precision_param": "bfloat16"},
    "all": {"parallelism.data_parallel_shard_degree": -1, "activation_checkpoint.mode": "full",
            "training.mixed_precision_param": "bfloat16", "disagmoe.transfer_dtype": "bfloat16"},
}
CATEGORIES = ("param", "grad", "optimizer", "activation", "temp")


def run(name: str, args, overrides: list[str], folder: Path) -> dict:
    world = args.attention + args.experts
    settings = {"disagmoe.mode": "af_pipe", "disagmoe.attention_ranks": args.attention,
                "disagmoe.expert_ranks": args.experts, "disagmoe.microbatches": args.microbatches,
                "training.steps": 3, "training.local_batch_size": args.global_batch // args.attention,
                "metrics.memory_tracking_step": 2, "metrics.enable_tensorboard": "false",
                "checkpoint.enable": "false", "job.dump_folder": str(folder), **FEATURES[name]}
    cmd = ["./run_train.sh"] + [f"--{k}={v}" for k, v in settings.items()] + overrides
    env = {**os.environ, "NGPU": str(world)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    tracked = next(r for r in rows if "tracked_memory_mib" in r)
    return {k: v for k, v in tracked.items() if k.startswith("tracked_")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(FEATURES))
    parser.add_argument("--attention", type=int, default=2, help="attention ranks")
    parser.add_argument("--experts", type=int, default=2, help="expert ranks")
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args, overrides = parser.parse_known_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            results[name] = run(name, args, overrides, Path(tmp) / name)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"peak MiB per pool (largest rank), af_pipe A{args.attention} F{args.experts}, "
          f"{args.microbatches} micro-batches, global batch {args.global_batch}; step 2 under MemTracker")
    header = ["config"] + [f"{pool} {c}" for pool in ("attention", "expert") for c in ("peak", *CATEGORIES)]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    base = results.get("none")
    for name, r in results.items():
        cells = [name]
        for pool in ("attention", "expert"):
            peak = r[f"tracked_memory_mib_{pool}"]
            ratio = f" ({peak / base[f'tracked_memory_mib_{pool}']:.2f}x)" if base and name != "none" else ""
            cells.append(f"{peak:.1f}{ratio}")
            cells += [f"{r[f'tracked_{c}_mib_{pool}']:.1f}" for c in CATEGORIES]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
