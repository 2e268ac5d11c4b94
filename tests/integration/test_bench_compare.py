"""``scripts/bench_compare.py --json`` end to end on a tiny run (2 ranks, 3 steps, global
batch 4 of 32 tokens): the structure of its output, never its speed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
LAYOUTS = ("ep", "ep_1f1b_interleaved", "ep_overlap")  # the plain, pipelined and overlapped colocated paths
RESULT_KEYS = {"layout", "ranks", "tokens_per_second", "mfu", "step_time_s", "memory_gib", "final_loss"}


def test_bench_compare_json_structure(tmp_path):
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, DISAGMOE_CACHE_DIR=str(tmp_path / "cache"), PATH=path)
    proc = subprocess.run(
        [sys.executable, "scripts/bench_compare.py", "--json", "--layouts", ",".join(LAYOUTS), "--world-size", "2",
         "--steps", "3", "--warmup", "1", "--global-batch", "4", "--pp-microbatches", "2",
         "--training.seq_len", "32", "--metrics.peak_flops", "1e11"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out.keys() >= {"results", "ratio_vs_ep", "speedup"}
    assert [r["layout"] for r in out["results"]] == list(LAYOUTS)
    for result in out["results"]:
        assert RESULT_KEYS <= result.keys(), result
        assert result["ranks"] == 2 and result["tokens_per_second"] > 0 and result["step_time_s"] > 0
    # Only expert-parallel all-to-alls count dispatch bytes; the pipelined layout on 2 ranks
    # is pp 2 x dp 1, so it has none.
    assert out["results"][0]["dispatch_bytes"] > 0 and out["results"][2]["dispatch_bytes"] > 0
    assert set(out["ratio_vs_ep"]) == set(LAYOUTS) and out["ratio_vs_ep"]["ep"] == 1.0
    assert all(ratio > 0 for ratio in out["ratio_vs_ep"].values())
    assert out["speedup"] is None  # no af_pipe layout ran
    # Same data, same seed, same global batch: every layout ends on the same loss.
    losses = [r["final_loss"] for r in out["results"]]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0])
