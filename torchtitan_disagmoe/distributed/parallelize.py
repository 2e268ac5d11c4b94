"""Apply the colocated parallelisms to a model built on the meta device.

Order as in torchtitan's ``parallelize_*``: expert parallelism (reshapes expert weights),
torch.compile (per block), then FSDP2 (per block, then the root). Model code knows
nothing of any of this.
"""

from torch import nn
from torch.distributed.fsdp import fully_shard

from .expert_parallel import apply_expert_parallel
from .parallel_dims import ParallelDims


def apply_compile(model: nn.Module) -> None:
    """Compile each transformer block separately (token counts per expert vary: dynamic)."""
    # Module.compile keeps parameter names unchanged (no ``_orig_mod`` in FQNs).
    for block in model.layers.values():
        block.compile(dynamic=True)


def apply_fsdp(model: nn.Module, dims: ParallelDims, ignored_params: set[nn.Parameter]) -> None:
    """Shard blocks and then the root (embedding, final norm, head) over all ranks.

    Expert weights that expert parallelism already sharded are left to it (ignored here).
    """
    assert dims.dp_mesh is not None
    for block in model.layers.values():
        # The last block's parameters are needed again right away by backward.
        fully_shard(block, mesh=dims.dp_mesh, ignored_params=ignored_params)
    fully_shard(model, mesh=dims.dp_mesh, ignored_params=ignored_params)


def parallelize_model(model: nn.Module, dims: ParallelDims, compile_enabled: bool) -> list[nn.Parameter]:
    """Parallelize ``model`` in place for the colocated layout.

    Returns:
        The expert-parallel parameters (empty without expert parallelism), whose
        gradients the trainer reduces with ``reduce_expert_grads``.
    """
    expert_params: list[nn.Parameter] = []
    if dims.ep_enabled:
        assert dims.expert_mesh is not None
        expert_params = apply_expert_parallel(model, dims.expert_mesh)
    if compile_enabled:
        apply_compile(model)
    if dims.fsdp_enabled:
        apply_fsdp(model, dims, set(expert_params))
    return expert_params
