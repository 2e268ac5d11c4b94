"""Model arguments shared by the MoE transformer families, and their cost accounting.

Each family subclasses ``MoETransformerArgs`` and describes its attention; the rest (MoE
layers, dense layers, head) is common. ``flops_per_token`` is what MFU and the planner use,
so it counts every matmul a training step does, including the causal attention
score/value products: for a sequence of S tokens a query at position i attends to i+1
keys, (S+1)/2 on average. Training FLOPs = 3 x forward (backward = 2 x forward).
"""

from dataclasses import dataclass, field

from .moe import MoEArgs


@dataclass(kw_only=True)
class MoETransformerArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    max_seq_len: int = 4096
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    moe_inter_dim: int
    """Hidden dim of one routed (and one shared) expert."""
    moe: MoEArgs = field(default_factory=MoEArgs)
    n_dense_layers: int = 0
    """The first n layers use a dense FFN instead of MoE (DeepSeek style)."""
    dense_inter_dim: int = 0
    """Hidden dim of the dense FFN layers."""

    def __post_init__(self):
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers = {self.n_dense_layers} > n_layers = {self.n_layers}")
        if self.n_dense_layers and self.dense_inter_dim <= 0:
            raise ValueError("dense layers need dense_inter_dim > 0")

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers

    def validate_seq_len(self, seq_len: int) -> None:
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"training.seq_len = {seq_len} exceeds the model's max_seq_len = {self.max_seq_len}")

    # ---- attention: implemented per family -------------------------------------------
    def attention_params(self) -> int:
        raise NotImplementedError

    def attention_score_dims(self) -> tuple[int, int]:
        """(per-head q.k dim, per-head value dim) x n_heads gives score/value matmul widths."""
        raise NotImplementedError

    # ---- counts ----------------------------------------------------------------------
    def ffn_params(self, layer_id: int) -> tuple[int, int]:
        """(total, active per token) FFN parameters of a layer, router included."""
        if not self.is_moe_layer(layer_id):
            n = 3 * self.dim * self.dense_inter_dim
            return n, n
        expert = 3 * self.dim * self.moe_inter_dim
        router = self.dim * self.moe.num_experts
        shared = expert * self.moe.num_shared_experts
        total = expert * self.moe.num_experts + shared + router
        active = expert * self.moe.top_k + shared + router
        return total, active

    def num_params(self) -> tuple[int, int]:
        """(total, active per token) parameters, embeddings and head included."""
        norms = 2 * self.dim
        total = active = 2 * self.vocab_size * self.dim + self.dim  # embedding, head, final norm
        for layer_id in range(self.n_layers):
            ffn_total, ffn_active = self.ffn_params(layer_id)
            total += self.attention_params() + norms + ffn_total
            active += self.attention_params() + norms + ffn_active
        return total, active

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length ``seq_len``."""
        qk_dim, v_dim = self.attention_score_dims()
        mean_keys = (seq_len + 1) / 2  # causal
        forward = 2 * self.dim * self.vocab_size  # output head (embedding lookup is free)
        for layer_id in range(self.n_layers):
            _, ffn_active = self.ffn_params(layer_id)
            forward += 2 * (self.attention_params() + ffn_active)
            forward += 2 * self.n_heads * (qk_dim + v_dim) * mean_keys
        return 3 * forward
