"""Hugging Face safetensors weights in and out, through torchtitan 0.2.2's state-dict adapters.

Our models have torchtitan's parameter names (FQNs), so its Qwen3 and DeepSeek-V3 adapters
translate them to HF names unchanged: per-expert HF tensors
``model.layers.{l}.mlp.experts.{e}.gate_proj.weight`` (H, D) are slices of our stacked
``layers.{l}.moe.experts.w1`` (E, H, D) along dim 0, with no transpose (``up_proj`` -> ``w3``,
``down_proj`` (D, H) -> ``w2`` (E, D, H)). Loading goes through torchtitan's
``CheckpointManager`` (``checkpoint.initial_load_path`` + ``initial_load_in_hf``): each rank
converts *its own* state dict to HF names (``to_hf``), DCP reads exactly those tensors (or
slices of them) from the safetensors files, and ``from_hf`` stacks the experts back. A rank
holding a part of the model (af_pipe, expert-parallel shards) therefore reads only that part.

Shape legend: E experts, H expert hidden dim, D model dim.

Write a tiny HF checkpoint from a seeded model (what the tests do), then train from it:

    python -m torchtitan_disagmoe.components.hf_import --model qwen3_moe --flavor debug --seed 7 /tmp/hf
    ./run_train.sh --checkpoint.initial_load_path /tmp/hf --checkpoint.initial_load_in_hf true
"""

import argparse
import glob
import json
import logging
import os
import re
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, Replicate
from torchtitan.models.deepseek_v3.model.state_dict_adapter import DeepSeekV3StateDictAdapter
from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter

from torchtitan_disagmoe.models.args import MoETransformerArgs

logger = logging.getLogger("torchtitan_disagmoe")


# ---- adapters ------------------------------------------------------------------------
class _ReplicatedExpertsMixin:
    """torchtitan reads ``placement.dim`` of every placement of an expert DTensor, which
    fails on our ``Replicate()`` over ``edp`` (colocated experts are [Replicate, Shard(0)]
    on ("edp", "ep") even when edp = 1). Replicated mesh dims split nothing: drop them and
    let torchtitan compute this rank's expert range from the sharded dims alone."""

    def _caculate_indices_from_placements(self, dim, dim_size, dtensor_placements, device_mesh):
        kept = [i for i, p in enumerate(dtensor_placements) if not isinstance(p, Replicate)]
        if len(kept) == len(dtensor_placements):
            return super()._caculate_indices_from_placements(dim, dim_size, dtensor_placements, device_mesh)
        if not kept:
            return 0, dim_size
        names = tuple(device_mesh.mesh_dim_names[i] for i in kept)
        return super()._caculate_indices_from_placements(
            dim, dim_size, tuple(dtensor_placements[i] for i in kept), device_mesh[names])


class Qwen3MoEAdapter(_ReplicatedExpertsMixin, Qwen3StateDictAdapter):
    """torchtitan's Qwen3 adapter. ``moe.expert_bias`` has no HF counterpart (HF Qwen3-MoE
    routes without a bias): it is neither written nor read, so it keeps its initial zeros."""


class DeepSeekMoEAdapter(_ReplicatedExpertsMixin, DeepSeekV3StateDictAdapter):
    """torchtitan's DeepSeek-V3 adapter (``moe.expert_bias`` <-> ``mlp.gate.e_score_correction_bias``)."""


def build_tt_model_args(model_name: str, args: MoETransformerArgs):
    """torchtitan's model arguments with our sizes (what its adapters read: experts, q_lora_rank,
    weight tying), or None for a family torchtitan has no adapter for."""
    from torchtitan.models.moe import MoEArgs as TTMoEArgs

    moe = TTMoEArgs(num_experts=args.moe.num_experts, num_shared_experts=args.moe.num_shared_experts,
                    top_k=args.moe.top_k, score_func=args.moe.score_func, route_norm=args.moe.route_norm,
                    route_scale=args.moe.route_scale)
    if model_name == "qwen3_moe":
        from torchtitan.models.qwen3.model.args import Qwen3ModelArgs

        return Qwen3ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                              vocab_size=args.vocab_size, head_dim=args.head_dim, norm_eps=args.norm_eps,
                              rope_theta=args.rope_theta, max_seq_len=args.max_seq_len, enable_weight_tying=False,
                              moe_enabled=True, moe_inter_dim=args.moe_inter_dim, moe_args=moe)
    if model_name == "deepseek_moe":
        from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs

        return DeepSeekV3ModelArgs(
            max_seq_len=args.max_seq_len, vocab_size=args.vocab_size, dim=args.dim, inter_dim=args.dense_inter_dim,
            moe_inter_dim=args.moe_inter_dim, n_layers=args.n_layers, n_dense_layers=args.n_dense_layers,
            n_heads=args.n_heads, norm_eps=args.norm_eps, moe_args=moe, q_lora_rank=args.q_lora_rank,
            kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_nope_head_dim,
            qk_rope_head_dim=args.qk_rope_head_dim, v_head_dim=args.v_head_dim,
            original_seq_len=args.original_seq_len, rope_theta=args.rope_theta, rope_factor=args.rope_factor,
            beta_fast=args.beta_fast, beta_slow=args.beta_slow, mscale=args.mscale)
    return None


_ADAPTERS = {"qwen3_moe": Qwen3MoEAdapter, "deepseek_moe": DeepSeekMoEAdapter}


def build_sd_adapter(model_name: str, model_args: MoETransformerArgs, hf_assets_path: str | None = None):
    """The torchtitan state-dict adapter for one of our model families, or None if unsupported.

    Args:
        model_name: ``model.name`` (a registry key).
        model_args: the flavor's arguments.
        hf_assets_path: folder with ``model.safetensors.index.json`` (only used to shard HF saves).
    """
    tt_args = build_tt_model_args(model_name, model_args)
    if tt_args is None:
        return None
    return _ADAPTERS[model_name](tt_args, hf_assets_path)


# ---- writing an HF checkpoint ----------------------------------------------------------
def hf_config(model_name: str, args: MoETransformerArgs, dtype: torch.dtype) -> dict[str, Any]:
    """A ``config.json`` as HF transformers writes it for the family (Qwen3-MoE, DeepSeek-V3)."""
    common = dict(vocab_size=args.vocab_size, hidden_size=args.dim, num_hidden_layers=args.n_layers,
                  num_attention_heads=args.n_heads, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                  max_position_embeddings=args.max_seq_len, hidden_act="silu", attention_bias=False,
                  tie_word_embeddings=False, torch_dtype=str(dtype).removeprefix("torch."),
                  num_experts_per_tok=args.moe.top_k, norm_topk_prob=args.moe.route_norm,
                  moe_intermediate_size=args.moe_inter_dim)
    if model_name == "qwen3_moe":
        return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", **common,
                    num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, num_experts=args.moe.num_experts,
                    intermediate_size=args.moe_inter_dim, decoder_sparse_step=1, mlp_only_layers=[])
    yarn = None
    if args.uses_yarn:
        yarn = dict(type="yarn", factor=args.rope_factor, original_max_position_embeddings=args.original_seq_len,
                    beta_fast=args.beta_fast, beta_slow=args.beta_slow, mscale=args.mscale,
                    mscale_all_dim=args.mscale)
    return dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", **common,
                num_key_value_heads=args.n_heads, intermediate_size=args.dense_inter_dim,
                n_routed_experts=args.moe.num_experts, n_shared_experts=args.moe.num_shared_experts,
                first_k_dense_replace=args.n_dense_layers, moe_layer_freq=1,
                q_lora_rank=args.q_lora_rank or None, kv_lora_rank=args.kv_lora_rank,
                qk_nope_head_dim=args.qk_nope_head_dim, qk_rope_head_dim=args.qk_rope_head_dim,
                v_head_dim=args.v_head_dim, scoring_func=args.moe.score_func,
                routed_scaling_factor=args.moe.route_scale, topk_method="greedy", n_group=1, topk_group=1,
                rope_scaling=yarn, rope_interleave=True)


def save_hf_checkpoint(model: nn.Module, model_name: str, model_args: MoETransformerArgs, folder: str,
                       dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write ``model`` as an HF checkpoint: ``model-0000i-of-0000n.safetensors`` shards,
    ``model.safetensors.index.json`` and ``config.json``.

    Args:
        model: a whole model (sharded DTensors are gathered: then call on every rank; only
            rank 0 writes).
        dtype: stored dtype (default: the parameters' own).
        max_shard_bytes: start a new file when a shard would exceed this.

    Returns:
        The HF tensor names written.
    """
    from safetensors.torch import save_file

    adapter = build_sd_adapter(model_name, model_args)
    if adapter is None:
        raise ValueError(f"model.name = {model_name!r} has no HF state-dict adapter; allowed: {sorted(_ADAPTERS)}")
    state_dict = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
                  for k, v in model.state_dict().items()}
    hf_state_dict = adapter.to_hf(state_dict)
    dropped = sorted(k for k, v in state_dict.items() if not adapter.to_hf({k: v}))
    if dropped:
        logger.info(f"not in the HF format (kept out): {dropped[:4]}{' ...' if len(dropped) > 4 else ''}")
    if dist.is_initialized() and dist.get_rank() != 0:
        return sorted(hf_state_dict)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes, total = 0, 0
    for key in sorted(hf_state_dict):
        # Experts come out of to_hf as views of one stacked tensor; safetensors refuses shared storage.
        tensor = hf_state_dict[key].to(dtype or hf_state_dict[key].dtype).contiguous().clone()
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
        total += size
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    used_dtype = dtype or next(iter(hf_state_dict.values())).dtype
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config(model_name, model_args, used_dtype), f, indent=2)
    return sorted(hf_state_dict)


# ---- reading: checks, and the load without a checkpoint manager ----------------------------
def check_hf_checkpoint(path: str, hf_state_dict: dict[str, Any], model_desc: str) -> list[str]:
    """What keeps this rank's tensors from loading from ``path``, as readable sentences.

    Reads only the safetensors headers. Empty list: every tensor this rank asks for is in the
    checkpoint with the shape the model expects.
    """
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        return [(f"checkpoint.initial_load_path = {path!r} holds no *.safetensors files; give an HF model "
                 "folder, or set checkpoint.initial_load_in_hf = false for a DCP checkpoint")]
    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    missing = sorted(k for k in hf_state_dict if k not in shapes)
    wrong = sorted((k, shapes[k], tuple(v.shape)) for k, v in hf_state_dict.items()
                   if k in shapes and shapes[k] != tuple(v.shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors that {model_desc} needs are not in {path!r}, e.g. {missing[:3]}; "
                        "is it a checkpoint of this model family?")
    for key, got, want in wrong[:5]:
        problems.append(f"{key} has shape {list(got)} in {path!r} but {model_desc} expects {list(want)}; "
                        "do model.name and model.flavor match the checkpoint's config.json?")
    if len(wrong) > 5:
        problems.append(f"... and {len(wrong) - 5} more tensors of the wrong shape")
    return problems


def verify_hf_checkpoint(path: str, adapter, model: nn.Module, model_desc: str) -> None:
    """Raise ValueError on every rank if any rank's tensors cannot load from ``path``.

    Collective when a process group exists: ranks own different tensors (af_pipe), so one
    rank may find a problem the others do not; all of them must stop, not hang in DCP.
    """
    problems = check_hf_checkpoint(path, adapter.to_hf(get_model_state_dict(model)), model_desc)
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[list[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, problems)
        problems = list(dict.fromkeys(p for rank_problems in everyone for p in rank_problems))
    if problems:
        raise ValueError("cannot load the HF checkpoint:\n  " + "\n  ".join(problems))


def load_initial_weights(model: nn.Module, path: str, adapter=None) -> None:
    """Load model weights once, without a checkpoint manager (``checkpoint.enable = false``).

    The same steps as torchtitan's ``CheckpointManager.dcp_load`` (which only runs when
    checkpointing is enabled): HF names via the adapter, DCP reads what this rank holds,
    back to our names, copied into the parameters in place. ``adapter`` None: ``path`` is a
    DCP checkpoint and only the model's entries are read.
    """
    state_dict = get_model_state_dict(model)
    if adapter is not None:
        hf_state_dict = adapter.to_hf(state_dict)
        dcp.load(hf_state_dict, storage_reader=adapter.get_hf_storage_reader(path))
        state_dict = adapter.from_hf(hf_state_dict)
    else:
        dcp.load(state_dict, checkpoint_id=path)
    set_model_state_dict(model, state_dict, options=StateDictOptions(strict=False))


def _holds_a_checkpoint(folder: str) -> bool:
    """Whether torchtitan's manager would find a ``step-N`` checkpoint to resume from."""
    return any(re.fullmatch(r"step-\d+", name) and (os.path.isfile(os.path.join(folder, name, ".metadata")) or
               os.path.isfile(os.path.join(folder, name, "model.safetensors.index.json")))
               for name in os.listdir(folder))


def prepare_initial_load(config, model: nn.Module, model_args: MoETransformerArgs):
    """The adapter for ``checkpoint.initial_load_in_hf`` (None otherwise), after checking
    the HF files against this rank's part of the model if the initial load will happen
    (checkpointing off, or no checkpoint folder to resume from yet)."""
    c = config.checkpoint
    if not c.initial_load_path:
        return None
    folder = os.path.join(config.job.dump_folder, c.folder)
    if c.enable and os.path.isdir(folder) and not _holds_a_checkpoint(folder):
        # torchtitan loads initial weights only while the folder is absent: it would start
        # from the seeded initialisation here, silently ignoring initial_load_path.
        raise ValueError(f"checkpoint.initial_load_path is set but the checkpoint folder {folder!r} exists with no "
                         "step-N checkpoint in it, so nothing would be loaded; delete that folder or use another "
                         "job.dump_folder")
    if not c.initial_load_in_hf:
        return None
    adapter = build_sd_adapter(config.model.name, model_args)
    if adapter is None:
        raise ValueError(f"checkpoint.initial_load_in_hf = true but model.name = {config.model.name!r} has no "
                         f"HF state-dict adapter (supported: {sorted(_ADAPTERS)})")
    if not c.enable or not os.path.isdir(folder):
        verify_hf_checkpoint(c.initial_load_path, adapter, model, f"{config.model.name}/{config.model.flavor}")
    return adapter


def _main() -> None:
    from torchtitan_disagmoe.models import get_model_spec
    from torchtitan_disagmoe.models.init import init_model_weights_

    parser = argparse.ArgumentParser(description="Write an HF checkpoint of a freshly initialised model.")
    parser.add_argument("folder")
    parser.add_argument("--model", default="qwen3_moe")
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = parser.parse_args()
    spec = get_model_spec(a.model)
    args = spec.get_flavor(a.flavor)
    model = spec.model_cls(args)
    init_model_weights_(model, lambda name: spec.init_rule(name, args.dim), a.seed)
    keys = save_hf_checkpoint(model, a.model, args, a.folder, getattr(torch, a.dtype))
    print(f"wrote {len(keys)} tensors of {a.model}/{a.flavor} (seed {a.seed}) to {a.folder}")


if __name__ == "__main__":
    _main()
