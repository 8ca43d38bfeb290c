"""The plain-module model of :mod:`plain_modules` with its vision tower frozen."""

from plain_modules import workload as _plain

from spindle.declare.workload import Workload


def workload() -> Workload:
    return _plain(frozen=True)
