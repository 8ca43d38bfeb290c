"""Layer providers: the ``nn.Module``s components are made of (:mod:`spindle.layers.provider`),
the built-in transformer stacks (:mod:`spindle.layers.builtin`, :mod:`spindle.layers.blocks`,
their analytic costs in :mod:`spindle.layers.costmodel`) and the one operator loop every
consumer runs (:mod:`spindle.layers.chain`)."""

from __future__ import annotations

from spindle.declare.workload import Workload
from spindle.layers.builtin import BuiltinProvider
from spindle.layers.provider import LayerProvider


def provider_for(workload: Workload) -> LayerProvider:
    """The provider of ``workload``'s layers."""
    return BuiltinProvider(workload)
