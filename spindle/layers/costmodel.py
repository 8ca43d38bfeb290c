"""Analytic sizes of one transformer layer: FLOPs, parameters and activation bytes.

These are exact counts of the matrix multiplications the runtime's blocks perform (the
blocks in ``spindle.runtime.model``), used by the hardware model, the memory model and the
simulator.  Elementwise work (norms, softmax, activations) is not counted as FLOPs; the hardware
model charges it as per-layer overhead and memory traffic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spindle.declare.workload import Component


def layer_parameters(kind: str, hidden: int, ffn: int) -> int:
    """Parameters of one block (weights, biases, norm gains/biases)."""
    h = hidden
    attn = 4 * h * h + 4 * h  # q, k, v, o with biases
    if kind == "llm":
        mlp = 3 * h * ffn  # SwiGLU: gate, up, down; no biases
        norms = 2 * h  # RMSNorm gains
    else:
        mlp = 2 * h * ffn + ffn + h
        norms = 4 * h  # two LayerNorms
    cross = 0
    if kind == "decoder":
        cross = 4 * h * h + 4 * h + 2 * h  # cross-attention + its LayerNorm
    return attn + mlp + norms + cross


def layer_forward_flops(
    kind: str, hidden: int, ffn: int, tokens: int, memory_tokens: int = 0
) -> float:
    """Forward FLOPs of one block for one sample of ``tokens`` tokens (2 per multiply-add)."""
    h, s = hidden, tokens
    proj = 2 * s * 4 * h * h  # q, k, v, o
    attn = 2 * 2 * s * s * h  # scores + weighted sum
    mlp = 2 * s * (3 if kind == "llm" else 2) * h * ffn
    cross = 0.0
    if kind == "decoder":
        m = memory_tokens
        cross = 2 * s * 2 * h * h + 2 * m * 2 * h * h + 2 * 2 * s * m * h
    return float(proj + attn + mlp + cross)


def layer_train_flops(kind: str, hidden: int, ffn: int, tokens: int, memory_tokens: int = 0) -> float:
    """Forward + backward FLOPs (backward = 2x forward) of one block for one sample."""
    return 3.0 * layer_forward_flops(kind, hidden, ffn, tokens, memory_tokens)


def layer_activation_elements(
    kind: str, hidden: int, ffn: int, heads: int, tokens: int, memory_tokens: int = 0
) -> float:
    """Elements one block keeps alive for backward, per sample (a standard accounting:
    inputs of every matmul and norm, attention probabilities, MLP intermediates)."""
    h, s = hidden, tokens
    elems = 10 * s * h + 2 * heads * s * s + (3 if kind == "llm" else 2) * s * ffn
    if kind == "decoder":
        elems += 4 * s * h + 2 * memory_tokens * h + 2 * heads * s * memory_tokens
    return float(elems)


def component_parameters(c: "Component") -> int:
    """Parameters of a whole component: blocks, adapter, final norm, projection, LM head."""
    total = c.layers * layer_parameters(c.kind, c.hidden, c.ffn_size)
    if c.input is not None:
        if c.input.type == "tokens":
            total += c.input.vocab * c.hidden  # type: ignore[operator]
        else:
            total += c.input.dim * c.hidden + c.hidden  # type: ignore[operator]
    total += c.hidden if c.kind == "llm" else 2 * c.hidden  # final RMSNorm / LayerNorm
    if c.output_dim is not None:
        total += c.hidden * c.output_dim
    if c.vocab is not None:
        total += c.hidden * c.vocab
    return total
