"""DeepSeek-MoE flavors. ``16B`` has the sizes of torchtitan 0.2.2's deepseek_v3 "16B"
flavor (DeepSeek-MoE-16B / DeepSeek-V2-Lite-like MLA); ``debug`` is ours, sized so the
default run trains on a 2-core CPU.

torchtitan's ``max_seq_len`` defaults to 16384 but is overwritten with the training
seq_len, so YaRN (``max_seq_len > original_seq_len``) is only active for seq_len > 4096.
Our rope cache is built from ``max_seq_len`` at construction, so ``16B`` uses 4096 (plain
RoPE, as the released model); raise ``max_seq_len`` to train longer with YaRN.
"""

from ..moe import MoEArgs
from .model import DeepSeekMoEArgs, DeepSeekMoEModel

_DEEPSEEK_ROUTER = dict(score_func="softmax", route_norm=False, route_scale=1.0)

deepseek_moe_flavors = {
    "debug": DeepSeekMoEArgs(
        vocab_size=2048, dim=128, n_layers=4, n_heads=4, max_seq_len=2048,
        n_dense_layers=1, dense_inter_dim=256, moe_inter_dim=64,
        q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        moe=MoEArgs(num_experts=8, num_shared_experts=2, top_k=2, **_DEEPSEEK_ROUTER),
    ),
    "16B": DeepSeekMoEArgs(
        vocab_size=102400, dim=2048, n_layers=27, n_heads=16, max_seq_len=4096,
        n_dense_layers=1, dense_inter_dim=10944, moe_inter_dim=1408,
        q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_theta=10000.0, original_seq_len=4096, rope_factor=40.0, beta_fast=32, beta_slow=1, mscale=0.70,
        moe=MoEArgs(num_experts=64, num_shared_experts=2, top_k=6, **_DEEPSEEK_ROUTER),
    ),
}

__all__ = ["DeepSeekMoEArgs", "DeepSeekMoEModel", "deepseek_moe_flavors"]
