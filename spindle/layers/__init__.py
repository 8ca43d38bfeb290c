"""Layer providers: the ``nn.Module``s components are made of (:mod:`spindle.layers.provider`),
the user's own stacks (:mod:`spindle.layers.user`), the built-in transformer stacks
(:mod:`spindle.layers.builtin`, :mod:`spindle.layers.blocks`,
their analytic costs in :mod:`spindle.layers.costmodel`) and the one operator loop every
consumer runs (:mod:`spindle.layers.chain`)."""

from __future__ import annotations

from spindle.declare.workload import ModuleStack, Workload
from spindle.layers.builtin import BuiltinProvider
from spindle.layers.provider import LayerProvider
from spindle.layers.user import UserProvider

_RECENT: list[tuple[Workload, LayerProvider]] = []
_KEEP = 8


def provider_for(workload: Workload) -> LayerProvider:
    """The provider of ``workload``'s layers: the user's modules for a workload of user stacks
    (:class:`~spindle.declare.modules.ModuleStack`), else the built-in transformer stacks.

    The same workload object (immutable) gets the same provider, so the shapes and costs a
    provider counts on the meta device are counted once per process (for the last few
    workloads)."""
    for known, provider in _RECENT:
        if known is workload:
            return provider
    provider = (UserProvider(workload)
                if any(isinstance(c, ModuleStack) for c in workload.components.values())
                else BuiltinProvider(workload))
    _RECENT.insert(0, (workload, provider))
    del _RECENT[_KEEP:]
    return provider
