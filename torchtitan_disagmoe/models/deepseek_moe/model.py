"""DeepSeek-MoE: Multi-head Latent Attention (MLA), dense first layer(s), shared experts.

Module and parameter names match torchtitan 0.2.2's ``DeepSeekV3Model``
(``layers.{i}.attention.wkv_a``, ``layers.{i}.attention.kv_norm``,
``layers.0.feed_forward.w1``, ``layers.{i}.moe.shared_experts.w1``, ...), so its DeepSeek
state-dict adapter and DCP checkpoints apply unchanged.

MLA (DeepSeek-V2): keys and values are compressed into one ``kv_lora_rank`` latent per
token (``wkv_a`` then ``kv_norm``) and expanded per head by ``wkv_b``; queries are a plain
projection (``wq``, ``q_lora_rank == 0``) or low-rank (``wq_a``, ``q_norm``, ``wq_b``).
Each head's q/k is [no-position part (qk_nope_head_dim) | rotary part (qk_rope_head_dim)];
the rotary part of the key comes straight from ``wkv_a`` and is shared by all heads.

RoPE rotates interleaved pairs (dims 2i, 2i+1), the DeepSeek-V2/V3 and torchtitan layout,
not the half-rotation layout of ``models/rope.py``. YaRN frequency scaling and the softmax
mscale correction are applied exactly when ``max_seq_len > original_seq_len``, with
torchtitan's formulas and arguments (rope_factor, beta_fast, beta_slow, mscale).

Shape legend: B batch, S sequence, D model dim, H heads, Dn/Dr no-position/rotary q-k head
dim, Dqk = Dn + Dr, Dv value head dim, C kv_lora_rank (latent), F = Dr // 2 frequencies.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..args import MoETransformerArgs
from ..transformer import MoETransformer


@dataclass(kw_only=True)
class DeepSeekMoEArgs(MoETransformerArgs):
    # DeepSeek defaults (torchtitan DeepSeekV3ModelArgs), overriding the base class's.
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Multi-head latent attention.
    q_lora_rank: int = 0
    """0: full-rank query projection ``wq``; > 0: ``wq_a`` -> ``q_norm`` -> ``wq_b``."""
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # YaRN: active only when max_seq_len > original_seq_len.
    original_seq_len: int = 4096
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim = {self.qk_rope_head_dim} must be even")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def uses_yarn(self) -> bool:
        return self.max_seq_len > self.original_seq_len

    def attention_params(self) -> int:
        if self.q_lora_rank == 0:
            q = self.dim * self.n_heads * self.qk_head_dim
        else:  # wq_a, q_norm, wq_b
            q = self.dim * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.n_heads * self.qk_head_dim
        kv_a = self.dim * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_norm = self.kv_lora_rank
        kv_b = self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
        o = self.n_heads * self.v_head_dim * self.dim
        return q + kv_a + kv_norm + kv_b + o

    def attention_score_dims(self) -> tuple[int, int]:
        return self.qk_head_dim, self.v_head_dim


# ---- RoPE (interleaved pairs) with YaRN -------------------------------------------------
def _yarn_correction_dim(num_rotations: float, rope_dim: int, base: float, seq_len: int) -> float:
    """Dimension index whose wavelength makes ``num_rotations`` turns over ``seq_len``."""
    return rope_dim * math.log(seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(args: DeepSeekMoEArgs) -> torch.Tensor:
    """Rotation frequency of each pair, shape (F,), YaRN-scaled when ``args.uses_yarn``.

    YaRN keeps high frequencies (many rotations over the original context) unchanged,
    divides low frequencies by ``rope_factor``, and ramps linearly between the dims that
    make ``beta_fast`` and ``beta_slow`` rotations over ``original_seq_len``.
    """
    rope_dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs_F = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if not args.uses_yarn:
        return freqs_F
    low = math.floor(_yarn_correction_dim(args.beta_fast, rope_dim, base, args.original_seq_len))
    high = math.ceil(_yarn_correction_dim(args.beta_slow, rope_dim, base, args.original_seq_len))
    low, high = max(low, 0), min(high, rope_dim - 1)
    if low == high:
        high += 0.001
    ramp_F = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_F = 1 - ramp_F  # 1: unscaled (high frequency), 0: fully interpolated
    return freqs_F / args.rope_factor * (1 - keep_F) + freqs_F * keep_F


def precompute_mla_rope_cache(args: DeepSeekMoEArgs) -> torch.Tensor:
    """Cos and sin of every (position, frequency), concatenated: shape (max_seq_len, 2*F)."""
    angles_SF = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), rope_frequencies(args))
    return torch.cat([angles_SF.cos(), angles_SF.sin()], dim=-1)


def apply_interleaved_rope(x_BSHDr: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) by its position's angle i (positions 0..S-1).

    Computed in fp32 and cast back, as torchtitan's complex-number version does.
    """
    seqlen, rope_dim = x_BSHDr.shape[1], x_BSHDr.shape[-1]
    cache = rope_cache[:seqlen].view(1, seqlen, 1, rope_dim)
    cos_F, sin_F = cache[..., : rope_dim // 2], cache[..., rope_dim // 2 :]
    pairs = x_BSHDr.float().unflatten(-1, (rope_dim // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos_F - odd * sin_F, even * sin_F + odd * cos_F], dim=-1)
    return rotated.flatten(-2).to(x_BSHDr.dtype)


# ---- model -------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head latent attention, causal, through ``F.scaled_dot_product_attention``."""

    def __init__(self, args: DeepSeekMoEArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = args.qk_head_dim, args.v_head_dim
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, args.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(self.q_lora_rank, eps=args.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, args.n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=args.norm_eps)
        self.wkv_b = nn.Linear(
            self.kv_lora_rank, args.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(args.n_heads * self.v_head_dim, args.dim, bias=False)
        self.softmax_scale = self.qk_head_dim**-0.5
        if args.uses_yarn:  # YaRN attention temperature, applied to q.k (hence squared)
            yarn_mscale = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
            self.softmax_scale *= yarn_mscale * yarn_mscale

    def forward(self, x_BSD: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x_BSD.shape
        # Heads inferred (-1) rather than n_heads: tensor parallelism may shard them.
        q = self.wq(x_BSD) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q_BSHDqk = q.view(bsz, seqlen, -1, self.qk_head_dim)
        q_nope_BSHDn, q_rope_BSHDr = q_BSHDqk.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_BSHDqk = torch.cat([q_nope_BSHDn, apply_interleaved_rope(q_rope_BSHDr, rope_cache)], dim=-1)

        latent_BSC, k_rope_BSDr = self.wkv_a(x_BSD).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_rope_BS1Dr = apply_interleaved_rope(k_rope_BSDr.unsqueeze(2), rope_cache)
        kv = self.wkv_b(self.kv_norm(latent_BSC)).view(bsz, seqlen, -1, self.qk_nope_head_dim + self.v_head_dim)
        k_nope_BSHDn, v_BSHDv = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        n_local_heads = k_nope_BSHDn.shape[2]
        k_BSHDqk = torch.cat([k_nope_BSHDn, k_rope_BS1Dr.expand(-1, -1, n_local_heads, -1)], dim=-1)

        out_BHSDv = F.scaled_dot_product_attention(
            q_BSHDqk.transpose(1, 2), k_BSHDqk.transpose(1, 2), v_BSHDv.transpose(1, 2),
            is_causal=True, scale=self.softmax_scale,
        )
        return self.wo(out_BHSDv.transpose(1, 2).reshape(bsz, seqlen, -1))


class DeepSeekMoEModel(MoETransformer):
    attention_cls = Attention

    @staticmethod
    def rope_cache_for(args: DeepSeekMoEArgs) -> torch.Tensor:
        return precompute_mla_rope_cache(args)
