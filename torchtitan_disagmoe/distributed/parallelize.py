"""Apply the colocated parallelisms to a model built on the meta device.

Order as in torchtitan's ``parallelize_*``: expert parallelism (reshapes expert weights),
torch.compile (per block), then FSDP2 (per block, then the root). Model code knows
nothing of any of this.
"""

from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .expert_parallel import apply_expert_parallel
from .parallel_dims import ParallelDims


def apply_compile(model: nn.Module) -> None:
    """Compile each transformer block separately (token counts per expert vary: dynamic)."""
    # Module.compile keeps parameter names unchanged (no ``_orig_mod`` in FQNs).
    for block in model.layers.values():
        block.compile(dynamic=True)


def apply_fsdp(roots: list[nn.Module], dims: ParallelDims, ignored_params: set[nn.Parameter],
               reshard_after_forward: bool = True, mp_policy: MixedPrecisionPolicy | None = None) -> None:
    """Shard each root's blocks and then the root (embedding, final norm, head) over the
    data-parallel ranks (HSDP when ``dims.dp_mesh`` is 2-D). A root is the whole model, or
    one pipeline stage. ``mp_policy``: bf16 mixed precision (components/mixed_precision.py).

    Expert weights that expert parallelism already sharded are left to it (ignored here).
    With pipeline parallelism each block runs forward once per micro-batch, so keeping
    it unsharded until backward (``reshard_after_forward=False``, as torchtitan does)
    saves an all-gather per micro-batch.
    """
    assert dims.dp_mesh is not None
    kwargs = dict(mesh=dims.dp_mesh, ignored_params=ignored_params, reshard_after_forward=reshard_after_forward,
                  mp_policy=mp_policy or MixedPrecisionPolicy())
    for root in roots:
        for block in root.layers.values():
            fully_shard(block, **kwargs)
        fully_shard(root, **kwargs)


def parallelize_model(model: nn.Module, dims: ParallelDims, compile_enabled: bool,
                      stage_modules: list[nn.Module] | None = None, overlap_chunks: int = 0,
                      mp_policy: MixedPrecisionPolicy | None = None) -> list[nn.Parameter]:
    """Parallelize ``model`` in place for the colocated layout.

    Args:
        stage_modules: with pipeline parallelism, this rank's stages (sharing their
            modules with ``model``); FSDP2 wraps each of them instead of ``model``.
        overlap_chunks: > 0 swaps in the overlapping all-to-all dispatcher with this many
            token chunks (``parallelism.expert_parallel_overlap``).
        mp_policy: FSDP2's mixed-precision policy (``training.mixed_precision_param``).

    Returns:
        The expert-parallel parameters (empty without expert parallelism), whose
        gradients the trainer reduces with ``reduce_expert_grads``.
    """
    expert_params: list[nn.Parameter] = []
    if dims.ep_enabled:
        assert dims.expert_mesh is not None
        expert_params = apply_expert_parallel(model, dims.expert_mesh, overlap_chunks)
    if compile_enabled:
        apply_compile(model)
    if dims.fsdp_enabled:
        roots = [model] if stage_modules is None else stage_modules
        apply_fsdp(roots, dims, set(expert_params), reshard_after_forward=stage_modules is None, mp_policy=mp_policy)
    return expert_params
