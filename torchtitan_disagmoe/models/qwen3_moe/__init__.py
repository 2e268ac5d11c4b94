"""Qwen3-MoE flavors. Real sizes from the Qwen3 model cards / HF config.json files
(also in torchtitan 0.2.2 ``models/qwen3/__init__.py``); ``debug`` is ours, sized so the
default run trains on a 2-core CPU in about a minute."""

from ..moe import MoEArgs
from .model import Qwen3MoEArgs, Qwen3MoEModel

_QWEN3_ROUTER = dict(score_func="softmax", route_norm=True, route_scale=1.0, num_shared_experts=0)

qwen3_moe_flavors = {
    "debug": Qwen3MoEArgs(
        vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
        moe_inter_dim=128, max_seq_len=2048, rope_theta=1_000_000.0,
        moe=MoEArgs(num_experts=8, top_k=2, **_QWEN3_ROUTER),
    ),
    "30B-A3B": Qwen3MoEArgs(
        vocab_size=151936, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128,
        moe_inter_dim=768, max_seq_len=262144, rope_theta=1_000_000.0,
        moe=MoEArgs(num_experts=128, top_k=8, **_QWEN3_ROUTER),
    ),
    "235B-A22B": Qwen3MoEArgs(
        vocab_size=151936, dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, head_dim=128,
        moe_inter_dim=1536, max_seq_len=40960, rope_theta=5_000_000.0,
        moe=MoEArgs(num_experts=128, top_k=8, **_QWEN3_ROUTER),
    ),
}

__all__ = ["Qwen3MoEArgs", "Qwen3MoEModel", "qwen3_moe_flavors"]
