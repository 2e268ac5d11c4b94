"""Layout-independent weight initialisation.

Every parameter is drawn from its own random generator, seeded by (seed, parameter name)
and, for stacked expert weights, by the expert index too. A rank that holds only a shard
of a parameter (FSDP2 shard, experts of one expert-parallel rank, a disaggregated pool)
therefore fills its shard with exactly the values a single process would have: runs in
any layout start from the same model, which is what makes parity tests and loss-curve
comparisons meaningful. Expert weights are generated one expert at a time, so a rank
never materialises experts it does not own.

The distributions follow torchtitan's ``init_weights`` for these model families
(normal embeddings, truncated normal projections with depth-scaled std for output
projections, ones for norms); the init rule per name lives in each model's
``init_rule``.
"""

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class InitRule:
    kind: str  # "normal", "trunc_normal", "ones", "zeros"
    std: float = 0.02
    cutoff: float = 2.0  # truncation at +-cutoff (torch default a=-2, b=2 is absolute)
    absolute_cutoff: bool = True
    per_expert: bool = False


def _generator(seed: int, name: str, index: int = -1) -> torch.Generator:
    # A 63-bit hash of (seed, name, index): any integer seed, stable across processes.
    digest = hashlib.blake2b(f"{seed}:{name}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _sample(shape: torch.Size, rule: InitRule, gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.float32)
    if rule.kind == "ones":
        return out.fill_(1.0)
    if rule.kind == "zeros":
        return out.zero_()
    if rule.kind == "normal":
        return out.normal_(0.0, rule.std, generator=gen)
    if rule.kind == "trunc_normal":
        bound = rule.cutoff if rule.absolute_cutoff else rule.cutoff * rule.std
        return nn.init.trunc_normal_(out, 0.0, rule.std, -bound, bound, generator=gen)
    raise ValueError(f"unknown init kind {rule.kind!r}")


def _local_view(param: torch.Tensor) -> tuple[torch.Tensor, torch.Size, tuple[int, ...]]:
    """(local tensor, global shape, global offset of the local block) of a (D)Tensor."""
    if hasattr(param, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = param.to_local()
        _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return local, param.shape, tuple(offset)
    return param, param.shape, (0,) * param.dim()


def _slices(offset: tuple[int, ...], shape: torch.Size) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


@torch.no_grad()
def init_parameter_(param: torch.Tensor, name: str, rule: InitRule, seed: int) -> None:
    """Fill this rank's block of ``param`` with the values of the full parameter."""
    local, global_shape, offset = _local_view(param)
    if local.numel() == 0:
        return
    if rule.per_expert:
        for i in range(local.shape[0]):
            expert = offset[0] + i
            full = _sample(global_shape[1:], rule, _generator(seed, name, expert))
            local[i].copy_(full[_slices(offset[1:], local.shape[1:])])
    else:
        full = _sample(global_shape, rule, _generator(seed, name))
        local.copy_(full[_slices(offset, local.shape)])


def init_model_weights_(model: nn.Module, init_rule: Callable[[str], InitRule], seed: int) -> None:
    """Initialise every parameter of ``model`` by name, then its buffers.

    Args:
        model: a model (or a part of one) whose parameters were materialised, possibly
            sharded; names must be the full model's FQNs.
        init_rule: maps a parameter FQN to its InitRule.
        seed: training.seed.
    """
    for name, param in model.named_parameters():
        init_parameter_(param, name, init_rule(name), seed)
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()


def transformer_init_rule(name: str, dim: int) -> InitRule:
    """torchtitan-style rule for a parameter FQN of the Qwen3/DeepSeek MoE families.

    Args:
        name: FQN such as ``layers.3.moe.experts.w2``.
        dim: model dim (the output head's std is dim**-0.5).
    """
    if name.endswith("norm.weight"):
        return InitRule("ones")
    if name == "tok_embeddings.weight":
        return InitRule("normal", std=1.0)
    if name == "output.weight":
        return InitRule("trunc_normal", std=dim**-0.5, cutoff=3.0, absolute_cutoff=False)
    layer_id = int(name.split(".")[1])
    depth_std = 0.02 / (2 * (layer_id + 1)) ** 0.5
    per_expert = ".moe.experts." in name
    leaf = name.split(".")[-2] if name.endswith(".weight") else name.split(".")[-1]
    if leaf in ("w1", "wq", "wk", "wv", "wq_a", "wq_b", "wkv_a", "wkv_b"):
        return InitRule("trunc_normal", std=0.02, per_expert=per_expert)
    return InitRule("trunc_normal", std=depth_std, per_expert=per_expert)  # wo, w2, w3, gate
