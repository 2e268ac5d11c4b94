"""Bytes of activations kept for backward by one forward of a model, per activation
checkpointing mode: the sum of the tensors autograd saves (``saved_tensors_hooks``), so the
figure does not depend on the allocator or on RSS. Selective ``op`` checkpointing keeps the
outputs of matmuls and attention in the checkpoint's own cache, which those hooks do not
see: they are counted with a dispatch mode and added.

    python scripts/activation_memory.py --flavor debug --batch 8 --seq-len 128
"""

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchtitan_disagmoe.models import get_model_spec
from torchtitan_disagmoe.models.activation_checkpoint import (_SAVE_OPS, ActivationCheckpointing,
                                                              apply_activation_checkpointing)
from torchtitan_disagmoe.models.init import init_model_weights_


def saved_bytes(model, tokens) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()  # a storage saved twice counts once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens).float().sum()
    return sum(seen.values())


class _SavedOpOutputs(TorchDispatchMode):
    """Sums the output bytes of the ops selective ``op`` checkpointing keeps."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _SAVE_OPS:
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.bytes += sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3_moe")
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    a = parser.parse_args()
    spec = get_model_spec(a.model)
    args = spec.get_flavor(a.flavor)
    model = spec.model_cls(args)
    init_model_weights_(model, lambda name: spec.init_rule(name, args.dim), seed=0)
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq_len))
    print(f"{a.model}/{a.flavor}, batch {a.batch} x {a.seq_len} tokens: activation bytes kept for backward")
    base = None
    for mode, option in [("none", "op"), ("selective", "2"), ("selective", "op"), ("full", "op")]:
        apply_activation_checkpointing(model, ActivationCheckpointing(mode, option))
        n = saved_bytes(model, tokens)
        if mode == "selective" and option == "op":
            apply_activation_checkpointing(model, ActivationCheckpointing("none"))
            with _SavedOpOutputs() as counter:
                model(tokens)
            n += counter.bytes
        base = base or n
        label = mode if mode in ("none", "full") else f"selective {option}"
        print(f"  {label:14s} {n / 2**20:8.2f} MiB  ({n / base:.2f}x)")


if __name__ == "__main__":
    main()
