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
from ..transformer import MoETransformer
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


class Qwen3MoEModel(MoETransformer):
    attention_cls = Attention

    @staticmethod
    def rope_cache_for(args: Qwen3MoEArgs) -> torch.Tensor:
        return precompute_rope_cache(args.head_dim, args.max_seq_len, args.rope_theta)
