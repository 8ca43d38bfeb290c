"""The built-in layers as ``nn.Module``s: transformer blocks, adapters, heads and the contrastive
loss (the modules :class:`spindle.layers.builtin.BuiltinProvider` builds).

Blocks: ``encoder`` = pre-LN bidirectional self-attention + GELU MLP; ``decoder`` = pre-LN causal
self-attention + pre-LN cross-attention to a memory + GELU MLP; ``llm`` = RMSNorm, causal
self-attention (q/k/v/o with biases) + SwiGLU MLP without biases.  Parameter names inside a
block (``norm1``, ``attn.q``, ..., ``mlp.fc1`` or ``mlp.gate``) are the logical names' tails;
:mod:`spindle.layers.costmodel` counts the FLOPs of exactly these matrix multiplications.

Every computation is row-wise in the batch except :class:`ContrastiveLoss`, so running a module
on rows ``[i, j)`` gives exactly those rows of the full-batch result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE_INIT = math.log(1.0 / 0.07)
LN_EPS = 1e-5
RMS_EPS = 1e-6


def norm(hidden: int, rms: bool) -> nn.Module:
    """LayerNorm (weight and bias), or RMSNorm (weight only) for ``llm`` components."""
    return nn.RMSNorm(hidden, eps=RMS_EPS) if rms else nn.LayerNorm(hidden, eps=LN_EPS)


class Attention(nn.Module):
    """Multi-head attention of ``x`` over ``kv`` with q/k/v/o projections (with biases)."""

    def __init__(self, hidden: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        s, d = kv.shape[1], h // self.heads
        q = self.q(x).view(b, t, self.heads, d).transpose(1, 2)
        k = self.k(kv).view(b, s, self.heads, d).transpose(1, 2)
        v = self.v(kv).view(b, s, self.heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o(o.transpose(1, 2).reshape(b, t, h))


class GeluMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, ffn, bias=False)
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """One pre-norm transformer block of ``kind`` (module docstring)."""

    def __init__(self, kind: str, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        rms = kind == "llm"
        self.kind = kind
        self.norm1 = norm(hidden, rms)
        self.attn = Attention(hidden, heads, causal=kind != "encoder")
        if kind == "decoder":
            self.norm_cross = norm(hidden, rms=False)
            self.cross = Attention(hidden, heads, causal=False)
        self.norm2 = norm(hidden, rms)
        self.mlp = SwiGLU(hidden, ffn) if rms else GeluMLP(hidden, ffn)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y)
        if self.kind == "decoder":
            if memory is None:
                raise ValueError("a decoder block needs a memory")
            x = x + self.cross(self.norm_cross(x), memory)
        return x + self.mlp(self.norm2(x))


class TokenEmbedding(nn.Module):
    """A token embedding table ``embedding`` [vocab, hidden]."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab, hidden))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embedding)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over a full batch of paired embeddings, with a learnable temperature
    ``logit_scale`` (initialised to log(1/0.07))."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.empty(()))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = F.normalize(a, dim=-1)
        b = F.normalize(b, dim=-1)
        logits = self.logit_scale.exp() * a @ b.T
        labels = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def sinusoidal_positions(tokens: int, hidden: int, like: torch.Tensor) -> torch.Tensor:
    """Fixed [tokens, hidden] sin/cos position embedding (no parameters)."""
    half = (hidden + 1) // 2
    pos = torch.arange(tokens, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    ang = pos * freq
    pe = torch.cat([ang.sin(), ang.cos()], dim=-1)[:, :hidden]
    return pe.to(dtype=like.dtype, device=like.device)
