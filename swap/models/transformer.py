"""A small causal character-level transformer language model (GPT-style pre-LayerNorm blocks:
Radford et al. 2019; causal self-attention, Vaswani et al. 2017), with LayerNorm and no
BatchNorm, so SWAP's phase-3 BN pass is a no-op for it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)); causal attention with ``heads`` heads."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Token ids int64 (B, T) -> next-token logits float (B, T, num_classes).

    Args:
        num_classes: vocabulary size (256 for bytes).
        seq_len: the longest context (learned position embeddings).
        width: multiplies the model width of 64 (rounded to a multiple of the heads).
        layers, heads: transformer blocks and attention heads.
    """

    def __init__(self, num_classes: int = 256, seq_len: int = 64, width: float = 1.0, layers: int = 2, heads: int = 4,
                 in_channels: int | None = None):
        super().__init__()
        dim = max(heads, int(round(64 * width / heads)) * heads)
        self.tok = nn.Embedding(num_classes, dim)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos[: x.shape[1]]
        return self.head(self.ln(self.blocks(h)))


def char_transformer(num_classes: int = 256, in_channels: int | None = None, width: float = 1.0,
                     seq_len: int = 64) -> CharTransformer:
    """The factory of :data:`swap.models.MODELS` (``in_channels`` is unused: the input is tokens)."""
    return CharTransformer(num_classes, seq_len, width)


__all__ = ["Block", "CharTransformer", "char_transformer"]
