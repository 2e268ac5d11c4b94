"""Memory per rank: weights, gradients, optimizer states and activations in flight.

Mixed precision as in Megatron / torchtitan with a distributed optimizer:
BF16 weights (2 B) and fp32 gradients (4 B) on every rank that holds a parameter, fp32
master weights + Adam m and v (12 B) sharded over the data-parallel replicas of that
parameter (attention-side parameters over the ranks of an attention group; experts in
AF-Pipe are not replicated, so their 12 B stay whole). On this-machine (fp32) there are no
master weights: 4 + 4 + 8 B.

Activations kept for backward, per token per layer (elem = bytes per element):
- attention side: elem x (4 D  [block input, attention norm out, residual, FFN norm out]
  + q + k + v widths + attention output) + 4 heads (softmax statistics, fp32)
  + 4 E (router probabilities, fp32) + elem x 3 H per shared expert / 3 H_dense (FFN);
- expert side, per routed copy: elem x (2 D + 3 H) (gathered input, gate/up outputs,
  activation, expert output kept for the routing-weight gradient), plus elem D per
  received row;
- full recomputation keeps only each layer's input (elem D per token; elem D per
  received row on the expert side) and pays one more forward.
The head's logits (elem + 4 B fp32 for the loss per vocabulary entry) exist for one
chunk of at most ``LOSS_CHUNK`` tokens at a time (a chunked / fused cross entropy; the
whole micro-batch at once would need t x V x 6 B, 40 GB for 32K tokens of GPT-OSS).
``usable_fraction`` leaves room for the allocator, communication buffers and the context.
"""

from dataclasses import dataclass

from .cost import LayerCost, ModelCosts
from .models import kv_width


@dataclass(frozen=True)
class MemoryPolicy:
    weight_bytes: int = 2
    grad_bytes: int = 4
    optimizer_bytes: int = 12
    usable_fraction: float = 0.9

    @classmethod
    def for_elem(cls, elem_bytes: int) -> "MemoryPolicy":
        return cls() if elem_bytes == 2 else cls(weight_bytes=4, grad_bytes=4, optimizer_bytes=8)

    def state_bytes(self, params: float, shards: int) -> float:
        """Weights + grads on this rank, optimizer states sharded ``shards`` ways."""
        return params * (self.weight_bytes + self.grad_bytes + self.optimizer_bytes / shards)


def attention_act_per_token(costs: ModelCosts, layer: LayerCost, recompute: bool) -> float:
    """Bytes the attention side keeps per token for one layer (see module docstring)."""
    args, e = costs.args, costs.cluster.elem_bytes
    if recompute:
        return e * args.dim
    q, kv, o = kv_width(args)
    act = e * (4 * args.dim + q + kv + o) + 4 * args.n_heads
    if layer.moe:
        act += 4 * args.moe.num_experts + e * 3 * args.moe_inter_dim * args.moe.num_shared_experts
    else:
        act += e * 3 * args.dense_inter_dim
    return act


def expert_act(costs: ModelCosts, rows: float, copies: float, recompute: bool) -> float:
    e, d, h = costs.cluster.elem_bytes, costs.dim, costs.args.moe_inter_dim
    if recompute:
        return e * d * rows
    return e * d * rows + e * (2 * d + 3 * h) * copies


LOSS_CHUNK = 4096


def head_transient(costs: ModelCosts, tokens: float) -> float:
    return min(tokens, LOSS_CHUNK) * costs.args.vocab_size * (costs.cluster.elem_bytes + 4)


@dataclass(frozen=True)
class MemoryReport:
    bytes_needed: float
    bytes_available: float
    what: str
    """Which rank kind was checked, e.g. 'attention group 0'."""

    @property
    def fits(self) -> bool:
        return self.bytes_needed <= self.bytes_available

    def reason(self) -> str:
        gib = 2**30
        return (f"{self.what} needs {self.bytes_needed / gib:.1f} GiB > "
                f"{self.bytes_available / gib:.1f} GiB usable")


def available(costs: ModelCosts, policy: MemoryPolicy) -> float:
    return costs.cluster.hbm_bytes * policy.usable_fraction


def worst(reports: list[MemoryReport]) -> MemoryReport:
    """The report with the least headroom (the one that decides whether a layout fits)."""
    return max(reports, key=lambda r: r.bytes_needed - r.bytes_available)
