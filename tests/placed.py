"""Test helper: place unplaced waves naively and run the plan validator on the result."""

from spindle.costs.graph import MetaGraph
from spindle.plan.checks import validate_plan
from spindle.plan.contract import Plan, Wave
from spindle.planner.placement import place_naive


def validate_placed(waves: list[Wave], graph: MetaGraph, num_devices: int) -> None:
    placed = tuple(place_naive(waves, num_devices))
    validate_plan(Plan("t", "t", "0", num_devices, 1, "", tuple(graph.metaops), placed),
                  graph.metaops)
