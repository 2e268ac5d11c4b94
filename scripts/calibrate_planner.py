"""Predicted vs measured step time of real runs on this CPU (docs/planner.md, section 8).

1. Calibrate (``planner/calibrate.py``, cached; ``--refresh`` measures again): the
   runtime's actions inside short af_pipe runs at global batches 1-6 (CPU per action,
   FSDP2 per unit), the stage functions on one thread, the one-process step, gloo costs,
   late rows of a computing sender and the cores concurrent ranks share.
2. Predict (``planner/cpu_predict.py``) af_pipe layouts (A 1-2, F 1-2, p 1-2, micro-batches
   1, 2, 4) and colocated EP on 2 and 4 ranks, all at the same global batch.
3. With ``--measure``: run each configuration for real (torchrun, gloo, the debug job
   file), ``--repeats`` times, and take the median over runs of each run's median step
   time after ``--warmup`` steps; print the table with the error. ``--probe`` times the
   one-process step again before each configuration and predicts with it (the host's
   speed drifts with other users' load); ``--nice -10`` shields the runs from that load.

    python scripts/calibrate_planner.py                    # predictions only (~4 min to calibrate the first time)
    python scripts/calibrate_planner.py --measure --repeats 2 --json out.json
    python scripts/calibrate_planner.py --measure --only "af_pipe A1 F1 p1 m2"
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from torchtitan_disagmoe.planner.calibrate import calibrate
from torchtitan_disagmoe.planner.cpu_predict import (
    AF_GRID,
    ModelShape,
    predict_af_pipe,
    predict_colocated,
)
from torchtitan_disagmoe.planner.host_bench import measure_trainer
from torchtitan_disagmoe.planner.runtime_trace import run_trainer


def run_config(kind: str, cfg: tuple, global_batch: int, steps: int, warmup: int, config: str) -> float:
    """One real run; the median ``elapsed_s`` of the steps after ``warmup``."""
    if kind == "af_pipe":
        a, f, p, m = cfg
        world, dp = a + f, a // p
        over = {"disagmoe.mode": "af_pipe", "disagmoe.attention_ranks": a, "disagmoe.expert_ranks": f,
                "disagmoe.pipeline_depth": p, "disagmoe.microbatches": m}
    else:
        (world,) = cfg
        dp = world
        over = {"disagmoe.mode": "colocated", "parallelism.expert_parallel_degree": world}
    over.update({"training.local_batch_size": global_batch // dp, "training.steps": steps, "metrics.log_freq": 1,
                 "checkpoint.enable": "false", "metrics.enable_tensorboard": "false", "metrics.timeline_step": 0})
    with tempfile.TemporaryDirectory() as dump:
        rows = run_trainer(world, over, config, dump)
    return statistics.median(r["elapsed_s"] for r in rows if r["step"] > warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per step, every layout")
    parser.add_argument("--measure", action="store_true", help="run the real jobs too")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--refresh", action="store_true", help="measure the calibration again")
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--config", default="train_configs/debug_model.toml")
    parser.add_argument("--json", default="", help="write the table here")
    parser.add_argument("--probe", action="store_true",
                        help="before each configuration, time the one-process step again (~15 s) and predict "
                             "with it: follows other users' load drifting between calibration and runs")
    parser.add_argument("--nice", type=int, default=0,
                        help="run calibration and jobs at this niceness (< 0 needs root): on a shared "
                             "host, shields the measurements from other users' load")
    args = parser.parse_args()
    if args.nice:
        os.nice(args.nice)  # inherited by every process started below
    cal = calibrate(refresh=args.refresh)
    shape = ModelShape.of()

    def predict(kind, cfg, c):
        if kind == "af_pipe":
            return predict_af_pipe(c, *cfg, global_batch=args.global_batch, shape=shape)
        return predict_colocated(c, cfg[0], args.global_batch, shape=shape)
    configs = [("af_pipe", c) for c in AF_GRID] + [("colocated", (w,)) for w in (2, 4)]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    rows = []
    print(f"{'configuration':30} {'predicted s':>11} {'(fwd/bwd':>9} {'tail)':>7} {'measured s':>11} {'runs':>16} "
          f"{'error':>7}")
    for kind, cfg in configs:
        pred = predict(kind, cfg, cal)
        if only and pred.name not in only:
            continue
        probe = None
        if args.probe:
            probe = measure_trainer(args.config, steps=9)
            pred = predict(kind, cfg, dataclasses.replace(cal, trainer={**cal.trainer, **probe}))
        runs, loads = [], []
        if args.measure:
            for _ in range(args.repeats):
                runs.append(run_config(kind, cfg, args.global_batch, args.steps, args.warmup, args.config))
                loads.append(os.getloadavg()[0])
        measured = statistics.median(runs) if runs else None
        err = (pred.step_s - measured) / measured * 100 if measured else None
        rows.append({"configuration": pred.name, "predicted_s": pred.step_s, "forward_backward_s": pred.forward_backward_s,
                     "tail_s": pred.tail_s, "measured_s": measured, "runs_s": runs, "error_pct": err, "load_avg_1min": loads,
                     "probe": probe,
                     "time": time.strftime("%H:%M:%S")})
        print(f"{pred.name:30} {pred.step_s:11.4f} {pred.forward_backward_s:9.4f} {pred.tail_s:7.4f} "
              f"{measured if measured else float('nan'):11.4f} {' '.join(f'{r:.3f}' for r in runs):>16} "
              f"{err if err is not None else float('nan'):+6.1f}%", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"global_batch": args.global_batch, "calibration": cal.to_json(),
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
