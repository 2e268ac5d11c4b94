"""Evidence that the AF-Pipe overlaps: while micro-batch m's tokens are with the expert
pool, the attention rank computes other micro-batches (read from the action timeline the
runtime records). Structural, not timed: how much time that saves is measured by
scripts/bench_compare.py, never in tests (shared machines are noisy)."""

import json

import pytest

from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.config.manager import with_overrides

from .harness import run_train, spawn

pytestmark = pytest.mark.slow


def _timeline(tmp_path, microbatches: int) -> list:
    folder = tmp_path / f"mb{microbatches}"
    config = with_overrides(
        JobConfig(),
        job={"dump_folder": str(folder)},
        training={"steps": 2, "local_batch_size": 4, "seq_len": 32},
        disagmoe={"mode": "af_pipe", "attention_ranks": 1, "expert_ranks": 1, "microbatches": microbatches},
        metrics={"enable_tensorboard": False, "timeline_step": 2},
    )
    spawn(2, run_train, config, str(tmp_path / "cache"), None)
    return json.loads((folder / "timeline" / "rank0.json").read_text())["events"]


def _computed_while_away(events, mb: int) -> set[int]:
    """Micro-batches the attention rank computed between sending micro-batch ``mb`` to the
    experts (dispatch of layer 0) and running its layer 1 (which needs the combine)."""
    names = [(e[0], e[1], e[2]) for e in events]
    sent = names.index(("SEND_F", 0, mb))
    back = names.index(("FORWARD", 2, mb))
    return {e[2] for e in events[sent + 1:back] if e[0] in ("FORWARD", "FULL_BACKWARD")}


def test_attention_rank_computes_other_microbatches_while_experts_work(tmp_path):
    assert _computed_while_away(_timeline(tmp_path, 4), mb=0) - {0}
    # One micro-batch: nothing else to do, the attention rank can only wait.
    assert _computed_while_away(_timeline(tmp_path, 1), mb=0) == set()
