"""Rotary position embedding (RoPE), half-rotation layout as in Qwen3/Llama HF checkpoints.

Shape legend: S sequence, Dh rotated head dim, B batch, H heads.
"""

import torch


def precompute_rope_cache(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """Cos and sin of every (position, frequency), concatenated: shape (max_seq_len, 2*Dh)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles_SF = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles_SDh = torch.cat([angles_SF, angles_SF], dim=-1)
    return torch.cat([angles_SDh.cos(), angles_SDh.sin()], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary_emb(
    q_BSHDh: torch.Tensor, k_BSHDh: torch.Tensor, rope_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by their position (positions 0..S-1)."""
    seqlen, head_dim = q_BSHDh.shape[1], q_BSHDh.shape[-1]
    cache = rope_cache[:seqlen].view(1, seqlen, 1, 2 * head_dim)
    cos, sin = cache[..., :head_dim].to(q_BSHDh.dtype), cache[..., head_dim:].to(q_BSHDh.dtype)
    q_out = q_BSHDh * cos + _rotate_half(q_BSHDh) * sin
    k_out = k_BSHDh * cos + _rotate_half(k_BSHDh) * sin
    return q_out, k_out
