"""Activation checkpointing: keep a stage's inputs, recompute its activations in backward.

torchtitan's keys (``[activation_checkpoint] mode``, ``selective_ac_option``):

- ``full``: every transformer block (colocated) or every stage (af_pipe: each A-stage's
  attention part and each F-stage's expert computation) saves only its inputs;
- ``selective`` with an integer N: every N-th layer, the others keep their activations;
- ``selective`` with ``op``: every layer, but the outputs of matmuls and attention are
  saved (recomputed: norms, activations, routing, elementwise ops), which trades less
  memory saving for much less recompute.

Why ours instead of torch's ``checkpoint_wrapper`` (what torchtitan applies): the wrapper
inserts ``_checkpoint_wrapped_module`` into parameter names, which every layout here keys
on (initialisation by name, gradient gathers, failure reports), and af_pipe checkpoints
stage functions, not modules. Both use ``torch.utils.checkpoint`` (non-reentrant).

Forward-time side effects must not run twice: the routing counts of the load balancer
(``MoE.tokens_per_expert``) check ``is_recomputing()``.
"""

import contextlib
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_state = {"recomputing": 0}

# Ops whose outputs ``selective``/``op`` saves: the expensive ones to recompute.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.linear.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}
if hasattr(torch.ops.aten, "_grouped_mm"):
    _SAVE_OPS.add(torch.ops.aten._grouped_mm.default)


def is_recomputing() -> bool:
    """True while a checkpointed region re-runs its forward during backward."""
    return _state["recomputing"] > 0


@contextlib.contextmanager
def _recomputing(active: bool):
    _state["recomputing"] += int(active)
    try:
        yield
    finally:
        _state["recomputing"] -= int(active)


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class ActivationCheckpointing:
    """Which layers to checkpoint and how; ``run`` executes a function under it."""

    def __init__(self, mode: str = "none", selective_ac_option: str = "op"):
        self.mode = mode
        self.op_level = mode == "selective" and selective_ac_option == "op"
        self.every = int(selective_ac_option) if mode == "selective" and not self.op_level else 1

    def applies_to(self, layer_id: int) -> bool:
        """Layers 0, N, 2N... with ``selective`` N (torchtitan counts blocks the same way)."""
        return self.mode != "none" and layer_id % self.every == 0

    def run(self, layer_id: int, fn, *args):
        """``fn(*args)``, checkpointed if this layer is; any output structure."""
        if not self.applies_to(layer_id):
            return fn(*args)
        calls = [0]

        def body(*inner):
            calls[0] += 1  # the first call is the forward, later ones recompute
            with _recomputing(calls[0] > 1):
                return fn(*inner)

        extra = {"context_fn": partial(create_selective_checkpoint_contexts, _save_matmuls)} if self.op_level else {}
        return checkpoint(body, *args, use_reentrant=False, **extra)


NO_CHECKPOINTING = ActivationCheckpointing("none")


def apply_activation_checkpointing(model: torch.nn.Module, ac: ActivationCheckpointing) -> None:
    """Let every transformer block of ``model`` checkpoint its forward per ``ac``."""
    from .transformer import TransformerBlock

    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.activation_checkpointing = ac
