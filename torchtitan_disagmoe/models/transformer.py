"""The decoder both MoE families share: pre-norm blocks around a family's attention.

Module names match torchtitan 0.2.2 (``tok_embeddings``, ``layers.{i}.attention``,
``layers.{i}.attention_norm``, ``layers.{i}.ffn_norm``, ``layers.{i}.moe`` or
``layers.{i}.feed_forward``, ``norm``, ``output``). A family subclasses
``MoETransformer`` with its attention class and its RoPE table.
"""

import torch
from torch import nn

from .activation_checkpoint import NO_CHECKPOINTING
from .args import MoETransformerArgs
from .moe import FeedForward, MoE


class TransformerBlock(nn.Module):
    """Pre-norm block: dense FFN for the first ``n_dense_layers`` layers, MoE after.
    ``attention_part`` and ``ffn_part`` are exposed separately because the disaggregated
    runtime runs them on different ranks."""

    def __init__(self, layer_id: int, args: MoETransformerArgs, attention: nn.Module):
        super().__init__()
        self.layer_id = layer_id
        self.attention = attention
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.moe_enabled = args.is_moe_layer(layer_id)
        if self.moe_enabled:
            self.moe = MoE(args.moe, args.dim, args.moe_inter_dim)
        else:
            self.feed_forward = FeedForward(args.dim, args.dense_inter_dim)
        self.activation_checkpointing = NO_CHECKPOINTING  # set by apply_activation_checkpointing

    def attention_part(self, x: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.attention_norm(x), rope_cache)

    def ffn_part(self, h: torch.Tensor) -> torch.Tensor:
        ffn = self.moe if self.moe_enabled else self.feed_forward
        return h + ffn(self.ffn_norm(h))

    def _forward(self, x: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
        return self.ffn_part(self.attention_part(x, rope_cache))

    def forward(self, x: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
        return self.activation_checkpointing.run(self.layer_id, self._forward, x, rope_cache)


class MoETransformer(nn.Module):
    """Embedding, blocks, final norm and output head; subclasses set ``attention_cls``
    and ``rope_cache_for``."""

    attention_cls: type[nn.Module]

    def __init__(self, args: MoETransformerArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args, self.attention_cls(args)) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope_cache", self.rope_cache_for(args), persistent=False)

    @staticmethod
    def rope_cache_for(args: MoETransformerArgs) -> torch.Tensor:
        raise NotImplementedError

    def init_buffers(self) -> None:
        self.rope_cache = self.rope_cache_for(self.args).to(self.rope_cache.device)

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """Token ids (B, S) -> logits (B, S, vocab)."""
        h = self.tok_embeddings(tokens_BS)
        for layer in self.layers.values():
            h = layer(h, self.rope_cache)
        return self.output(self.norm(h))
