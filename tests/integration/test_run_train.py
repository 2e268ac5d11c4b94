"""``./run_train.sh`` end to end on CPU (torchrun, gloo, 2 ranks), as a user runs it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
REQUIRED_KEYS = {"step", "loss", "grad_norm", "lr", "tokens_per_second", "mfu", "memory_gib"}
AF_PIPE_KEYS = {"busy_fraction_attention", "busy_fraction_expert", "exposed_comm_fraction", "dispatch_bytes",
                "combine_bytes", "memory_gib_attention", "memory_gib_expert"}


def _run(tmp_path, *overrides, ngpu="2", timeout=300):
    # The interpreter running the tests provides python and torchrun for the script.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, NGPU=ngpu, DISAGMOE_CACHE_DIR=str(tmp_path / "cache"), PATH=path)
    return subprocess.run(
        ["./run_train.sh", "--job.dump_folder", str(tmp_path / "out"), *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_default_config_trains_and_writes_outputs(tmp_path):
    """The default job (AF-Pipe, 1 attention + 1 expert rank, 2 micro-batches)."""
    proc = _run(tmp_path, "--training.steps", "6", "--metrics.log_freq", "1", "--checkpoint.interval", "3",
                "--metrics.timeline_step", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, 7))
    for record in records:
        assert REQUIRED_KEYS | AF_PIPE_KEYS <= record.keys()
        assert record["tokens_per_second"] > 0 and 0 < record["mfu"] < 1
        assert 0 < record["busy_fraction_attention"] <= 1 and 0 < record["busy_fraction_expert"] <= 1
    assert records[-1]["loss"] < records[0]["loss"]
    assert {p.name for p in (tmp_path / "out" / "timeline").iterdir()} == {"rank0.json", "rank1.json"}
    assert list((tmp_path / "out" / "tb").glob("events.out.tfevents.*"))
    assert {p.name for p in (tmp_path / "out" / "checkpoint").iterdir()} >= {"step-3", "step-6"}


def test_bad_setting_fails_fast_naming_the_key(tmp_path):
    start = time.monotonic()
    proc = _run(tmp_path, "--disagmoe.attention_ranks", "3", timeout=120)
    assert proc.returncode != 0
    assert "disagmoe.attention_ranks + disagmoe.expert_ranks = 3 + 1 = 4" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 60
    # Nothing was written: a refused launch leaves no half-made outputs.
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_colocated_baseline_from_the_default_file(tmp_path):
    proc = _run(tmp_path, "--disagmoe.mode", "colocated", "--training.local_batch_size", "4",
                "--training.steps", "2", "--checkpoint.enable", "false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert REQUIRED_KEYS | {"dispatch_bytes", "combine_bytes"} <= record.keys()


def test_unknown_key_is_refused(tmp_path):
    proc = _run(tmp_path, "--training.stepz", "3", ngpu="1", timeout=120)
    assert proc.returncode != 0
    assert "unknown key 'training.stepz'" in proc.stdout + proc.stderr


def test_af_pipe_run_reports_transfer_bytes(tmp_path):
    proc = _run(tmp_path, "--disagmoe.mode", "af_pipe", "--disagmoe.attention_ranks", "2",
                "--disagmoe.expert_ranks", "2", "--disagmoe.pipeline_depth", "2", "--disagmoe.microbatches", "1",
                "--training.steps", "2", "--metrics.log_freq", "1", "--checkpoint.enable", "false",
                ngpu="4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert REQUIRED_KEYS | {"dispatch_bytes", "combine_bytes", "residual_bytes"} <= record.keys()
        # 4 layers x (global batch 8 x 1 dp rank x seq 128) tokens, one expert rank per group: every
        # token is one dispatch row of 4*128 + 4*2 + 8*3 bytes, plus 8 count bytes per layer.
        assert record["dispatch_bytes"] == 4 * (8 * 128 * (512 + 8 + 24) + 8)
        assert record["residual_bytes"] == 4 * 8 * 128 * 512
