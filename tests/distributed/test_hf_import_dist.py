"""HF weights import on 2-4 gloo ranks: every rank reads only the tensors it holds, and the
gathered model equals the single model the HF checkpoint was written from. Layouts: af_pipe
A1 F1 (attention side on rank 0, routed experts on rank 1), A1 F2 (experts split over 2
ranks), A2 F2 p2 (each rank holds every other layer); colocated EP 2 (FSDP2 shards and half
the experts per rank, as DTensors), EP 2 x EDP 2 on 4 ranks (experts also replicated) and
pipeline parallel 2 (each rank holds half the layers).

Run: .venv/bin/python -m pytest -q tests/distributed/test_hf_import_dist.py
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchtitan_disagmoe.config.manager import with_overrides

from ..unit.test_hf_import import hf_config, write_hf
from .harness import spawn

pytestmark = pytest.mark.slow


def _af_pipe(a: int, f: int, p: int = 1) -> dict:
    return dict(disagmoe={"mode": "af_pipe", "attention_ranks": a, "expert_ranks": f, "pipeline_depth": p},
                parallelism={"expert_parallel_degree": 1})


# name: (ranks, config overrides)
LAYOUTS = {
    "af_pipe-A1F1": (2, _af_pipe(1, 1)),
    "ep2": (2, dict(disagmoe={"mode": "colocated"}, parallelism={"expert_parallel_degree": 2},
                    training={"local_batch_size": 1})),
    "af_pipe-A1F2": (3, _af_pipe(1, 2)),
    "pp2": (2, dict(disagmoe={"mode": "colocated"}, parallelism={
        "pipeline_parallel_degree": 2, "pipeline_parallel_schedule": "1F1B", "expert_parallel_degree": 1})),
    # These two load through torchtitan's CheckpointManager (checkpointing on), the others
    # without it (checkpoint.enable = false).
    "af_pipe-A2F2p2": (4, {**_af_pipe(2, 2, 2), "checkpoint": {"enable": True}}),
    "ep2-edp2": (4, dict(disagmoe={"mode": "colocated"}, parallelism={"expert_parallel_degree": 2},
                         training={"local_batch_size": 1}, checkpoint={"enable": True})),
}
CASES = [("qwen3_moe", "af_pipe-A1F1"), ("qwen3_moe", "ep2"), ("deepseek_moe", "af_pipe-A1F1"),
         ("deepseek_moe", "ep2"), ("qwen3_moe", "af_pipe-A1F2"), ("deepseek_moe", "af_pipe-A2F2p2"),
         ("qwen3_moe", "ep2-edp2"), ("deepseek_moe", "pp2")]


def load_and_gather(config, cache_dir: str) -> dict[str, torch.Tensor]:
    """Start a Trainer (which loads the HF weights) and collect every whole tensor of its
    state dict from whichever ranks hold it, checking that replicas agree."""
    from torchtitan_disagmoe.trainer import Trainer

    trainer = Trainer(config, cache_dir=cache_dir)
    try:
        local = {}
        for fqn, tensor in trainer.model.state_dict().items():
            local[fqn] = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
    finally:
        trainer.close()
    merged: dict[str, torch.Tensor] = {}
    for rank_state in everyone:
        for fqn, tensor in rank_state.items():
            if fqn in merged:
                assert torch.equal(merged[fqn], tensor), f"replicas of {fqn} differ"
            merged[fqn] = tensor
    return merged


@pytest.mark.parametrize("name,layout", CASES, ids=[f"{n}-{lay}" for n, lay in CASES])
def test_hf_import_on_several_ranks(tmp_path, name, layout):
    hf_model = write_hf(tmp_path / "hf", name)
    config = hf_config(tmp_path, name, tmp_path / "hf")
    world_size, overrides = LAYOUTS[layout]
    config = with_overrides(config, **overrides)
    got = spawn(world_size, load_and_gather, config, str(tmp_path / "cache"))
    want = hf_model.state_dict()
    assert set(got) == set(want)
    for fqn, tensor in want.items():
        assert torch.equal(got[fqn], tensor), f"{fqn} differs from the HF checkpoint's model"



def start_or_error(config, cache_dir: str) -> str:
    """The ValueError message this rank's Trainer raised while starting ("" if none)."""
    from torchtitan_disagmoe.trainer import Trainer

    try:
        Trainer(config, cache_dir=cache_dir).close()
    except ValueError as e:
        return str(e)
    return ""


def test_mismatch_seen_by_one_rank_stops_every_rank(tmp_path):
    """Expert sizes that differ from the model's: only the af_pipe expert rank (1) holds
    expert tensors, yet rank 0 raises the same error instead of waiting inside DCP."""
    from dataclasses import replace

    from torchtitan_disagmoe.models import get_model_spec

    args = get_model_spec("qwen3_moe").get_flavor("debug")
    write_hf(tmp_path / "hf", "qwen3_moe", args=replace(args, moe_inter_dim=64))
    world_size, overrides = LAYOUTS["af_pipe-A1F1"]
    config = with_overrides(hf_config(tmp_path, "qwen3_moe", tmp_path / "hf"), **overrides)
    rank0_error = spawn(world_size, start_or_error, config, str(tmp_path / "cache"))
    assert "experts.0.gate_proj.weight has shape [64, 128]" in rank0_error
    assert "qwen3_moe/debug expects [128, 128]" in rank0_error
