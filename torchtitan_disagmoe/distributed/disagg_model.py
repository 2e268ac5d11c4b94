"""Cut the full model down to what one rank of a disaggregated run owns.

Every rank builds the whole model on the meta device (no memory), keeps the modules of
its role and drops the rest, then materialises and initialises only what it kept. Names
(FQNs) are untouched, so a checkpoint moves between disaggregated and colocated layouts.

What lives where (DESIGN.md section 2; our choices for the open points):
- attention rank of group g, for its layers l = g, g+p, ...: attention_norm, attention,
  ffn_norm, the router (and its ``expert_bias``), shared experts, and whole dense FFN
  layers. Shared experts stay with attention: they see every token, so running them where
  the tokens are moves no bytes and keeps the expert pool's work purely routed.
- ``tok_embeddings`` on attention group 0 (layer 0's group);
- ``norm`` and ``output`` (head and loss) on attention group ``L mod p``, the group that
  would run layer L: the last combine goes there like any other, and with p = 1 the head
  sits on the rank that owns the sequences.
- expert rank of group g: only ``moe.experts`` of its MoE layers, sharded over the group.
"""

from torch import nn

from .disagg_dims import DisaggDims
from .expert_parallel import shard_experts

_ATTENTION_SIDE = ("attention", "attention_norm", "ffn_norm", "feed_forward")


def split_model(model: nn.Module, dims: DisaggDims, rank: int) -> list[nn.Parameter]:
    """Drop, in place, every module this rank does not own; shard its experts.

    Call on a meta-device model, before ``to_empty``.

    Returns:
        The expert parameters of this rank (empty on attention ranks).
    """
    role = dims.role(rank)
    mine = set(dims.layers_of_group(role.group))
    for layer_id in list(model.layers.keys()):
        if int(layer_id) not in mine:
            del model.layers[layer_id]
    if role.pool == "attention":
        if role.group != 0:
            model.tok_embeddings = None
        if role.group != dims.head_group:
            model.norm = None
            model.output = None
        for block in model.layers.values():
            if block.moe_enabled:
                block.moe.experts = None
        return []
    model.tok_embeddings = model.norm = model.output = None
    expert_params = []
    for layer_id in list(model.layers.keys()):
        block = model.layers[layer_id]
        if not block.moe_enabled:
            del model.layers[layer_id]  # dense layers run wholly on the attention pool
            continue
        for name in _ATTENTION_SIDE:
            if hasattr(block, name):
                setattr(block, name, None)
        moe = block.moe
        moe.router = moe.shared_experts = None
        del moe.expert_bias, moe.tokens_per_expert
        expert_params += shard_experts(moe.experts, dims.meshes[("expert", role.group)])
    return expert_params


def compile_stages(model: nn.Module, components: list[str]) -> None:
    """torch.compile what this rank's stages compute, each part on its own: ``attention``
    (attention, shared experts, dense FFN of an A-stage) and ``experts`` (the grouped
    experts of an F-stage). Rows per stage and tokens per expert change every step, so
    shapes are dynamic from the start. ``Module.compile`` keeps parameter names."""
    for block in model.layers.values():
        if "attention" in components:
            for name in ("attention", "feed_forward"):
                if getattr(block, name, None) is not None:
                    getattr(block, name).compile(dynamic=True)
        moe = getattr(block, "moe", None)
        if moe is None:
            continue
        if "attention" in components and moe.shared_experts is not None:
            moe.shared_experts.compile(dynamic=True)
        if "experts" in components and moe.experts is not None:
            moe.experts.compile(dynamic=True)


def shard_attention_group(model: nn.Module, mesh, num_layers: int, mp_policy=None) -> dict[int, list[nn.Module]]:
    """FSDP2 over the attention group's data-parallel ranks (HSDP on a 2-D ``mesh``), one
    unit per module the runtime calls (attention, norms, router, shared experts, dense
    FFN, embedding, head); ``mp_policy`` for bf16 mixed precision.

    Why not one unit per block as in colocated runs: the AF-Pipe runtime never calls a
    block's ``forward`` (an A-stage is the block's attention half plus routing), and FSDP2
    unshards on a module's forward. Parameters stay unsharded from forward to backward
    (as under pipeline parallelism): a stage's backward comes micro-batches later.

    Returns:
        The FSDP units of each A-stage (2l, and 2L for the head), so the runtime can
        gather a stage's weights once per step and reduce its gradients once, at the
        stage's last backward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    return {stage: [fully_shard(unit, mesh=mesh, reshard_after_forward=False,
                                mp_policy=mp_policy or MixedPrecisionPolicy()) for unit in units]
            for stage, units in attention_units(model, num_layers).items()}


def attention_units(model: nn.Module, num_layers: int) -> dict[int, list[nn.Module]]:
    """The modules the runtime calls in each A-stage (2l, and 2L for the head) that hold
    trainable parameters: what ``shard_attention_group`` makes FSDP2 units of (the planner
    counts them the same way)."""
    units_of_stage: dict[int, list] = {2 * num_layers: [model.norm, model.output]}
    for layer_id, block in model.layers.items():
        units = [block.attention_norm, block.attention, block.ffn_norm, getattr(block, "feed_forward", None)]
        moe = getattr(block, "moe", None)
        if moe is not None:
            units += [moe.router, moe.shared_experts]
        if int(layer_id) == 0:
            units.append(model.tok_embeddings)
        units_of_stage[2 * int(layer_id)] = units
    kept = {stage: [u for u in units if u is not None and any(p.requires_grad for p in u.parameters())]
            for stage, units in units_of_stage.items()}
    return {stage: units for stage, units in kept.items() if units}
