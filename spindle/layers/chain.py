"""The one operator loop: run a chain of consecutive operators of one MetaOp on local rows.

The runtime's executor runs every slice with it, the single-process reference every stage and
loss, and ``spindle profile`` the chains it times, so all three compute exactly the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from spindle.declare.workload import LayerRef
from spindle.layers.provider import Activation, LayerError, LayerProvider, Output


def run_chain(
    provider: LayerProvider, modules: Mapping[str, nn.Module], refs: Sequence[LayerRef],
    inputs: Mapping[str, Activation], carry: Activation | None,
    batch: Mapping[str, torch.Tensor], global_batch: int, recompute: bool = False,
) -> Output:
    """Operators ``refs`` one after another.  The first reads ``carry`` (the previous layer's
    output, when the chain starts inside a stage) or ``inputs`` (stage name -> output of the
    stages it reads; a chain that starts inside a stage without ``carry`` (its stage's earlier
    layers are another MetaOp) finds the previous layer's output under its own stage); an
    operator that starts a stage inside the chain reads the previous
    operator's output as its stage input.  ``batch``: the local rows of the task's data, by
    field (at least the fields the operators read).

    ``recompute``: every operator but a loss runs under ``torch.utils.checkpoint`` (not
    reentrant, RNG state preserved): backward recomputes its activations from its inputs, so a
    chain keeps only each operator's input (the memory model's ``recompute``)."""
    prev: Output | None = carry
    for j, ref in enumerate(refs):
        starts_stage = ref.is_loss or ref.layer == 0
        if starts_stage and j > 0:
            if not isinstance(prev, tuple):
                raise LayerError(f"operator {ref}: follows a loss inside its chain")
            stage_inputs: Mapping[str, Activation] = {refs[j - 1].stage: prev}
        else:
            stage_inputs = inputs if starts_stage else {}
        step_carry = None if starts_stage else prev
        if j == 0 and not starts_stage and step_carry is None:
            step_carry = inputs.get(ref.stage)
        if step_carry is not None and not isinstance(step_carry, tuple):
            raise LayerError(f"operator {ref}: the previous operator returned a loss")
        fields = {f: batch[f] for f in provider.fields(ref)}
        if recompute and not ref.is_loss:
            prev = checkpoint(provider.run, ref, modules, step_carry, stage_inputs, fields,
                              global_batch, use_reentrant=False)
        else:
            prev = provider.run(ref, modules, step_carry, stage_inputs, fields, global_batch)
    if prev is None:
        raise LayerError("an empty chain of operators")
    return prev
