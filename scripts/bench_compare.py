"""Side-by-side throughput of training layouts on the same model, data and global batch.

Each layout is a real ``./run_train.sh`` run (torchrun, gloo on CPU) with the same seed,
steps and global batch; warm-up steps are discarded and the rest averaged from each run's
metrics.jsonl. Layouts run one after another in one invocation, so they share the
machine's conditions; run it twice if the machine is busy.

    python scripts/bench_compare.py                          # single, fsdp2, ep on 2 ranks
    python scripts/bench_compare.py --layouts single,ep --world-size 4 --steps 30
    python scripts/bench_compare.py --json --training.seq_len 256   # overrides go to every run

Layouts: ``single`` (1 process), ``fsdp2`` (FSDP2 over all ranks, experts replicated),
``ep`` (FSDP2 + experts sharded over all ranks).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "single": lambda world: (1, {"parallelism.expert_parallel_degree": 1}),
    "fsdp2": lambda world: (world, {"parallelism.expert_parallel_degree": 1}),
    "ep": lambda world: (world, {"parallelism.expert_parallel_degree": world}),
}


def run_layout(name: str, world: int, args, overrides: list[str], folder: Path) -> dict:
    ranks, settings = LAYOUTS[name](world)
    settings = {**settings, "training.local_batch_size": args.global_batch // ranks,
                "training.steps": args.steps, "metrics.log_freq": 1, "checkpoint.enable": "false",
                "metrics.enable_tensorboard": "false", "job.dump_folder": str(folder)}
    cmd = ["./run_train.sh"] + [f"--{k}={v}" for k, v in settings.items()] + overrides
    env = dict(os.environ, NGPU=str(ranks), CONFIG_FILE=args.config)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"layout {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > args.warmup]
    seconds = sum(r["elapsed_s"] for r in timed)
    tokens = sum(r["tokens_per_second"] * r["elapsed_s"] for r in timed)
    return {
        "layout": name, "ranks": ranks, "tokens_per_second": tokens / seconds,
        "mfu": sum(r["mfu"] for r in timed) / len(timed),
        "step_time_s": seconds / len(timed), "memory_gib": max(r["memory_gib"] for r in records),
        "final_loss": records[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="single,fsdp2,ep")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5, help="steps discarded before timing")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--config", default="train_configs/debug_model.toml")
    parser.add_argument("--json", action="store_true")
    args, overrides = parser.parse_known_args()
    names = args.layouts.split(",")
    for name in names:
        if name not in LAYOUTS:
            parser.error(f"--layouts: unknown layout {name!r}; allowed: {list(LAYOUTS)}")
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_layout(n, args.world_size, args, overrides, Path(tmp) / n) for n in names]
    base = results[0]["tokens_per_second"]
    ratios = {r["layout"]: r["tokens_per_second"] / base for r in results}
    if args.json:
        print(json.dumps({"results": results, "ratio_vs_" + names[0]: ratios}, indent=2))
        return
    print(f"{'layout':8} {'ranks':>5} {'tokens/s':>10} {'step s':>8} {'MFU':>7} {'mem GiB':>8} "
          f"{'loss':>8} {'x ' + names[0]:>10}")
    for r in results:
        print(f"{r['layout']:8} {r['ranks']:5d} {r['tokens_per_second']:10.0f} {r['step_time_s']:8.3f} "
              f"{100 * r['mfu']:6.2f}% {r['memory_gib']:8.2f} {r['final_loss']:8.4f} {ratios[r['layout']]:10.2f}")


if __name__ == "__main__":
    main()
