"""Importing Hugging Face safetensors weights (``checkpoint.initial_load_path`` +
``initial_load_in_hf``) through torchtitan's state-dict adapters: a tiny HF checkpoint
written from a model initialised with one seed loads into a Trainer started with another
seed, for both model families, with or without checkpointing; every parameter and buffer
and the logits then equal the source model's. Bad paths and wrong models are refused with
messages that name the key and the fix.

Run: .venv/bin/python -m pytest -q tests/unit/test_hf_import.py
"""

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from torchtitan_disagmoe.components.hf_import import save_hf_checkpoint
from torchtitan_disagmoe.config.job_config import Checkpoint, JobConfig
from torchtitan_disagmoe.config.manager import with_overrides
from torchtitan_disagmoe.models import get_model_spec
from torchtitan_disagmoe.models.init import init_model_weights_

SEED_HF, SEED_RUN = 3, 11
FAMILIES = ["qwen3_moe", "deepseek_moe"]


def seeded_model(name: str, seed: int, args=None) -> torch.nn.Module:
    """The debug flavor initialised from ``seed``; DeepSeek's routing bias made non-zero so
    that its HF counterpart (``e_score_correction_bias``) is exercised too."""
    spec = get_model_spec(name)
    args = args or spec.get_flavor("debug")
    model = spec.model_cls(args)
    init_model_weights_(model, lambda fqn: spec.init_rule(fqn, args.dim), seed)
    if name == "deepseek_moe":
        gen = torch.Generator().manual_seed(seed)
        for fqn, buf in model.named_buffers():
            if fqn.endswith("expert_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen))
    return model


def write_hf(folder, name: str, seed: int = SEED_HF, args=None) -> torch.nn.Module:
    model = seeded_model(name, seed, args)
    spec = get_model_spec(name)
    # Small shards: the loader must gather tensors from several files.
    save_hf_checkpoint(model, name, args or spec.get_flavor("debug"), str(folder), max_shard_bytes=2**20)
    return model


def hf_config(tmp_path, name: str, hf_folder, **checkpoint) -> JobConfig:
    return with_overrides(
        JobConfig(),
        job={"dump_folder": str(tmp_path / "run")},
        model={"name": name, "flavor": "debug"},
        training={"steps": 2, "local_batch_size": 2, "seq_len": 32, "seed": SEED_RUN},
        checkpoint={"initial_load_path": str(hf_folder), "initial_load_in_hf": True, **checkpoint},
        metrics={"enable_tensorboard": False},
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def assert_same_weights(want: torch.nn.Module, got: torch.nn.Module) -> None:
    want_sd, got_sd = want.state_dict(), got.state_dict()
    assert set(want_sd) == set(got_sd)
    for fqn, tensor in want_sd.items():
        assert torch.equal(tensor, got_sd[fqn]), f"{fqn} differs from the HF checkpoint's model"


@pytest.mark.parametrize("name", FAMILIES)
def test_written_checkpoint_has_the_hf_layout(tmp_path, name):
    """Per-expert HF tensors are (H, D) / (D, H) slices of our stacked (E, H, D) / (E, D, H)
    experts, no transpose; index and config.json as HF writes them."""
    model = write_hf(tmp_path, name)
    args = get_model_spec(name).get_flavor("debug")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hidden_size"] == args.dim and config["num_hidden_layers"] == args.n_layers
    assert config["model_type"] == {"qwen3_moe": "qwen3_moe", "deepseek_moe": "deepseek_v3"}[name]
    layer = args.n_dense_layers  # the first MoE layer
    experts = model.layers[str(layer)].moe.experts
    for hf_name, ours in (("gate_proj", experts.w1), ("up_proj", experts.w3), ("down_proj", experts.w2)):
        key = f"model.layers.{layer}.mlp.experts.5.{hf_name}.weight"
        with safe_open(str(tmp_path / index["weight_map"][key]), framework="pt") as f:
            assert torch.equal(f.get_tensor(key), ours[5].detach())
    assert tuple(experts.w1[5].shape) == (args.moe_inter_dim, args.dim)


@pytest.mark.parametrize("enable", [False, True], ids=["no-checkpointing", "checkpointing"])
@pytest.mark.parametrize("name", FAMILIES)
def test_trainer_starts_from_hf_weights(tmp_path, cache_dir, name, enable):
    from torchtitan_disagmoe.trainer import Trainer

    hf_model = write_hf(tmp_path / "hf", name)
    assert not torch.equal(seeded_model(name, SEED_RUN).output.weight, hf_model.output.weight)
    trainer = Trainer(hf_config(tmp_path, name, tmp_path / "hf", enable=enable), cache_dir=cache_dir)
    try:
        assert_same_weights(hf_model, trainer.model)
        tokens = torch.randint(0, get_model_spec(name).get_flavor("debug").vocab_size, (2, 32))
        with torch.no_grad():
            assert torch.equal(trainer.model(tokens), hf_model(tokens))
        assert trainer.step == 0
    finally:
        trainer.close()


def test_resume_takes_precedence_over_the_initial_load(tmp_path, cache_dir):
    """Once the run has its own checkpoint, a restart resumes from it, not from the HF weights."""
    from torchtitan_disagmoe.trainer import Trainer

    write_hf(tmp_path / "hf", "qwen3_moe")
    config = hf_config(tmp_path, "qwen3_moe", tmp_path / "hf", enable=True, interval=1)
    trainer = Trainer(config, cache_dir=cache_dir)
    try:
        trainer.train()
        trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    finally:
        trainer.close()
    again = Trainer(config, cache_dir=cache_dir)
    try:
        assert again.step == 2
        for fqn, tensor in trained.items():
            assert torch.equal(again.model.state_dict()[fqn], tensor), fqn
    finally:
        again.close()


def test_folder_without_safetensors_is_refused(tmp_path, cache_dir):
    from torchtitan_disagmoe.trainer import Trainer

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no \*\.safetensors files.*initial_load_in_hf = false"):
        Trainer(hf_config(tmp_path, "qwen3_moe", tmp_path / "empty"), cache_dir=cache_dir)


def test_checkpoint_of_another_family_is_refused(tmp_path, cache_dir):
    from torchtitan_disagmoe.trainer import Trainer

    write_hf(tmp_path / "hf", "qwen3_moe")
    with pytest.raises(ValueError, match=r"tensors that deepseek_moe/debug needs are not in"):
        Trainer(hf_config(tmp_path, "deepseek_moe", tmp_path / "hf"), cache_dir=cache_dir)


def test_checkpoint_of_another_size_is_refused(tmp_path, cache_dir):
    from torchtitan_disagmoe.trainer import Trainer

    args = get_model_spec("qwen3_moe").get_flavor("debug")
    write_hf(tmp_path / "hf", "qwen3_moe", args=replace(args, moe_inter_dim=64))
    with pytest.raises(ValueError, match=r"gate_proj.weight has shape \[64, 128\] in .* but qwen3_moe/debug "
                                         r"expects \[128, 128\]; do model.name and model.flavor match"):
        Trainer(hf_config(tmp_path, "qwen3_moe", tmp_path / "hf"), cache_dir=cache_dir)


def test_config_checks(tmp_path):
    with pytest.raises(ValueError, match="initial_load_in_hf = true needs checkpoint.initial_load_path"):
        Checkpoint(initial_load_in_hf=True)
    with pytest.raises(ValueError, match="initial_load_path = '/no/such/dir' is not a folder"):
        Checkpoint(initial_load_path="/no/such/dir")
    with pytest.raises(ValueError, match="loads weights only; set checkpoint.initial_load_model_only = true"):
        Checkpoint(initial_load_path=str(tmp_path), initial_load_in_hf=True, initial_load_model_only=False)
    with pytest.raises(ValueError, match="needs checkpoint.enable = true"):
        Checkpoint(initial_load_path=str(tmp_path), initial_load_model_only=False)
    Checkpoint(initial_load_path=str(tmp_path), initial_load_model_only=False, enable=True)


def test_empty_checkpoint_folder_does_not_silently_skip_the_load(tmp_path, cache_dir):
    """torchtitan skips the initial load once the checkpoint folder exists; an empty one
    (a run that died before its first save) would otherwise start from random weights."""
    from torchtitan_disagmoe.trainer import Trainer

    write_hf(tmp_path / "hf", "qwen3_moe")
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"exists with no step-N checkpoint in it.*delete that folder"):
        Trainer(hf_config(tmp_path, "qwen3_moe", tmp_path / "hf", enable=True), cache_dir=cache_dir)
