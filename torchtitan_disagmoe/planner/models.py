"""Model descriptions for the planner: the training registry, plus planner-only models.

Every model the trainer can run comes from ``get_model_spec(name).get_flavor(flavor)``
so the planner never disagrees with training. GPT-OSS-120B is not trainable here (yet);
``GptOssArgs`` describes it as a ``MoETransformerArgs`` so the same cost code applies.

Per-layer attention width: ``attention_window(args, layer)`` is the number of keys a
query may see (None: all previous tokens, causal). GPT-OSS alternates banded (128-token)
and full attention layers.
"""

from dataclasses import dataclass, field

from torchtitan_disagmoe.models import get_model_spec
from torchtitan_disagmoe.models.args import MoETransformerArgs
from torchtitan_disagmoe.models.moe import MoEArgs


@dataclass(kw_only=True)
class GptOssArgs(MoETransformerArgs):
    """GPT-OSS: GQA attention with biases and per-head sinks, alternating banded/full
    attention, SwiGLU experts with biases, a router with a bias. Planner-only."""

    n_kv_heads: int
    head_dim: int = 64
    sliding_window: int = 128
    layer_types: list[str] = field(default_factory=list)
    """'sliding_attention' or 'full_attention' per layer (HF ``layer_types``)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.layer_types:  # HF default: even layers banded, odd layers full
            self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(self.n_layers)]
        if len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, n_layers = {self.n_layers}")

    def attention_params(self) -> int:
        q = self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        weights = self.dim * (q + 2 * kv) + q * self.dim
        biases = q + 2 * kv + self.dim
        return weights + biases + self.n_heads  # + one sink logit per head

    def attention_score_dims(self) -> tuple[int, int]:
        return self.head_dim, self.head_dim

    def ffn_params(self, layer_id: int) -> tuple[int, int]:
        expert = 3 * self.dim * self.moe_inter_dim + 2 * self.moe_inter_dim + self.dim  # + biases
        router = self.dim * self.moe.num_experts + self.moe.num_experts
        return (expert * self.moe.num_experts + router, expert * self.moe.top_k + router)

    def flops_per_token(self, seq_len: int) -> float:
        qk_dim, v_dim = self.attention_score_dims()
        forward = 2 * self.dim * self.vocab_size
        for layer_id in range(self.n_layers):
            forward += 2 * (self.attention_params() + self.ffn_params(layer_id)[1])
            forward += 2 * self.n_heads * (qk_dim + v_dim) * mean_keys(self, layer_id, seq_len)
        return 3 * forward


# GPT-OSS-120B, from the public HF config (openai/gpt-oss-120b config.json, also the
# defaults of transformers' GptOssConfig): 36 layers, hidden_size 2880, 128 local experts,
# 4 per token, intermediate_size 2880, 64 query heads and 8 KV heads of head_dim 64,
# vocab 201,088, sliding_window 128 on alternate layers, rope_theta 150,000, 131,072
# positions (YaRN). Counted this way it has 116.8 B parameters and 5.13 B active
# without the input embedding, matching the model card (117 B total, 5.1 B active).
PLANNER_ONLY = {
    ("gpt_oss", "120B"): lambda: GptOssArgs(
        vocab_size=201088, dim=2880, n_layers=36, n_heads=64, n_kv_heads=8, head_dim=64,
        moe_inter_dim=2880, max_seq_len=131072, rope_theta=150000.0, norm_eps=1e-5,
        moe=MoEArgs(num_experts=128, num_shared_experts=0, top_k=4, score_func="softmax", route_norm=True),
    ),
}


def load_model_args(name: str, flavor: str) -> MoETransformerArgs:
    """Model arguments from the training registry, or a planner-only description."""
    if (name, flavor) in PLANNER_ONLY:
        return PLANNER_ONLY[(name, flavor)]()
    if name in {n for n, _ in PLANNER_ONLY}:
        flavors = [f for n, f in PLANNER_ONLY if n == name]
        raise ValueError(f"model {name!r} (planner-only) has flavors {flavors}, not {flavor!r}")
    return get_model_spec(name).get_flavor(flavor)


def attention_window(args: MoETransformerArgs, layer_id: int) -> int | None:
    types = getattr(args, "layer_types", None)
    if types and types[layer_id] == "sliding_attention":
        return args.sliding_window
    return None


def mean_keys(args: MoETransformerArgs, layer_id: int, seq_len: int) -> float:
    """Keys a query attends to, averaged over positions 0..S-1 (causal, maybe banded)."""
    window = attention_window(args, layer_id)
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # positions i < window see i+1 keys, the rest see window keys
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def kv_width(args: MoETransformerArgs) -> tuple[int, int, int]:
    """(q, k+v, attention output) widths per token, for activation memory.

    MLA (DeepSeek) expands its latent KV to full heads before the score product.
    """
    qk_dim, v_dim = args.attention_score_dims()
    n_kv = getattr(args, "n_kv_heads", args.n_heads)
    return args.n_heads * qk_dim, n_kv * (qk_dim + v_dim), args.n_heads * v_dim
