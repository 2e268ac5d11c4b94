"""Activation checkpointing changes memory, not numbers: with ``full``, ``selective`` op and
``selective`` every-2nd-layer, the loss curve and every gradient equal the run without it
(exactly in one process; the af_pipe and EP runs are held to the single-process
reference like every layout). The recompute really happens (counted), and the routing
counts of the load balancer are not counted twice (the bias update is on, so a double
count would change the loss curve)."""

import pytest
import torch

from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.config.manager import with_overrides

from .harness import run_distributed, run_single
from .test_colocated_parity import assert_matches_reference

pytestmark = pytest.mark.slow
STEPS = 6
MODES = [("full", "op"), ("selective", "op"), ("selective", "2")]


def _config(folder, mode="none", option="op", af_pipe=False, ep=1) -> JobConfig:
    return with_overrides(
        JobConfig(),
        job={"dump_folder": str(folder)},
        training={"steps": STEPS, "local_batch_size": 4 // ep, "seq_len": 32},
        parallelism={"expert_parallel_degree": ep},
        disagmoe={"mode": "af_pipe", "attention_ranks": 1, "expert_ranks": 1, "microbatches": 2} if af_pipe else {},
        moe={"load_balance": "both", "aux_loss_coeff": 1e-2, "bias_update_rate": 1e-2},
        activation_checkpoint={"mode": mode, "selective_ac_option": option},
        metrics={"enable_tensorboard": False},
    )


def count_attention_calls(trainer) -> None:
    """Count forward calls of each layer's attention (a recompute calls it again)."""
    trainer.attention_calls = {}
    for name, block in trainer.model.layers.items():
        def hook(module, args, output, name=name):
            trainer.attention_calls[name] = trainer.attention_calls.get(name, 0) + 1
        block.attention.register_forward_hook(hook)


def _counting_steps(config, cache):
    """One training step; returns how often each layer's attention ran."""
    from torchtitan_disagmoe.trainer import Trainer

    trainer = Trainer(config, cache_dir=cache)
    count_attention_calls(trainer)
    try:
        trainer.train_step()
    finally:
        trainer.close()
    return trainer.attention_calls


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The run without checkpointing, in one process: the reference for every test here."""
    base = tmp_path_factory.mktemp("plain")
    return run_single(_config(base / "out"), str(base / "cache"), steps=STEPS)


@pytest.mark.parametrize("mode,option", MODES, ids=["full", "selective-op", "selective-2"])
def test_single_process_gradients_identical(tmp_path, plain, mode, option):
    cache = str(tmp_path / "cache")
    checkpointed = run_single(_config(tmp_path / "ac", mode, option), cache, steps=STEPS)
    assert checkpointed["losses"] == plain["losses"]
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(checkpointed["grads"][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode,option,expected", [
    ("none", "op", {"0": 1, "1": 1, "2": 1, "3": 1}),
    ("full", "op", {"0": 2, "1": 2, "2": 2, "3": 2}),
    ("selective", "op", {"0": 2, "1": 2, "2": 2, "3": 2}),  # re-entered, matmuls replayed from cache
    ("selective", "2", {"0": 2, "1": 1, "2": 2, "3": 1}),
])
def test_recompute_happens_where_configured(tmp_path, mode, option, expected):
    from .harness import run_single_fn

    calls = run_single_fn(_counting_steps, _config(tmp_path / "out", mode, option), str(tmp_path / "cache"))
    assert calls == expected


@pytest.mark.parametrize("mode,option", MODES[:2], ids=["full", "selective-op"])
def test_af_pipe_with_activation_checkpointing_matches_reference(tmp_path, plain, mode, option):
    """Per stage: the A-stage's attention part and the F-stage's expert computation."""
    result = run_distributed(_config(tmp_path / "af", mode, option, af_pipe=True), 2, str(tmp_path / "cache"),
                             steps=STEPS)
    assert_matches_reference(result, plain)


def test_expert_parallel_with_full_checkpointing_matches_reference(tmp_path, plain):
    """The recompute re-runs the all-to-all on every rank in the same order."""
    result = run_distributed(_config(tmp_path / "ep", "full", ep=2), 2, str(tmp_path / "cache"), steps=STEPS)
    assert_matches_reference(result, plain)
