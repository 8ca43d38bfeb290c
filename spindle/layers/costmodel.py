"""Analytic costs of one built-in transformer block: FLOPs and activation elements.

These are exact counts of the matrix multiplications the blocks of :mod:`spindle.layers.blocks`
perform, which :class:`spindle.layers.builtin.BuiltinProvider` reports for the hardware model,
the memory model and the simulator.  Elementwise work (norms, softmax, activations) is not
counted as FLOPs; the hardware model charges it as per-layer overhead and memory traffic.
(Parameter counts are not here: they are read off the modules themselves.)
"""

from __future__ import annotations


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


def layer_train_flops(
    kind: str, hidden: int, ffn: int, tokens: int, memory_tokens: int = 0
) -> float:
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
