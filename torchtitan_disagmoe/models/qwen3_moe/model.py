"""Qwen3-MoE: GQA attention with q/k RMSNorm and RoPE, every layer an MoE layer.

Module and parameter names match torchtitan 0.2.2's ``Qwen3Model`` (``tok_embeddings``,
``layers.{i}.attention.wq``, ``layers.{i}.moe.experts.w1``, ``norm``, ``output``), so its
Qwen3 state-dict adapter and DCP checkpoints apply unchanged.

Shape legend: B batch, S sequence, D model dim, Hq/Hkv query/key-value heads, Dh head dim.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..args import MoETransformerArgs
from ..moe import MoE, FeedForward
from ..rope import apply_rotary_emb, precompute_rope_cache


@dataclass(kw_only=True)
class Qwen3MoEArgs(MoETransformerArgs):
    n_kv_heads: int
    head_dim: int = 128
    qk_norm: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads = {self.n_heads} must be a multiple of n_kv_heads = {self.n_kv_heads}")

    def attention_params(self) -> int:
        q = self.dim * self.n_heads * self.head_dim
        kv = 2 * self.dim * self.n_kv_heads * self.head_dim
        o = self.n_heads * self.head_dim * self.dim
        return q + kv + o + (2 * self.head_dim if self.qk_norm else 0)

    def attention_score_dims(self) -> tuple[int, int]:
        return self.head_dim, self.head_dim


class Attention(nn.Module):
    def __init__(self, args: Qwen3MoEArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = nn.RMSNorm(args.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.k_norm = nn.RMSNorm(args.head_dim, eps=args.norm_eps) if args.qk_norm else None

    def forward(self, x_BSD: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x_BSD.shape
        q = self.wq(x_BSD).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x_BSD).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x_BSD).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_emb(q, k, rope_cache)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class TransformerBlock(nn.Module):
    """Pre-norm block. ``attention_part`` and ``ffn_part`` are exposed separately because
    the disaggregated runtime runs them on different ranks."""

    def __init__(self, layer_id: int, args: Qwen3MoEArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.moe_enabled = args.is_moe_layer(layer_id)
        if self.moe_enabled:
            self.moe = MoE(args.moe, args.dim, args.moe_inter_dim)
        else:
            self.feed_forward = FeedForward(args.dim, args.dense_inter_dim)

    def attention_part(self, x: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.attention_norm(x), rope_cache)

    def ffn_part(self, h: torch.Tensor) -> torch.Tensor:
        ffn = self.moe if self.moe_enabled else self.feed_forward
        return h + ffn(self.ffn_norm(h))

    def forward(self, x: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
        return self.ffn_part(self.attention_part(x, rope_cache))


class Qwen3MoEModel(nn.Module):
    def __init__(self, args: Qwen3MoEArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope_cache", self._rope_cache(), persistent=False)

    def _rope_cache(self) -> torch.Tensor:
        return precompute_rope_cache(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta)

    def init_buffers(self) -> None:
        self.rope_cache = self._rope_cache().to(self.rope_cache.device)

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """Token ids (B, S) -> logits (B, S, vocab)."""
        h = self.tok_embeddings(tokens_BS)
        for layer in self.layers.values():
            h = layer(h, self.rope_cache)
        return self.output(self.norm(h))
