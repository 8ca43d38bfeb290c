"""Test helper: place unplaced waves naively and run the plan validator on the result."""

from spindle.costs.graph import MetaGraph
from spindle.plan.contract import Plan, plan_metaops, validate_plan
from spindle.planner.placement import place_naive
from spindle.planner.schedule import WaveSpec


def validate_placed(waves: list[WaveSpec], graph: MetaGraph, num_devices: int) -> None:
    placed = tuple(place_naive(waves, num_devices))
    validate_plan(Plan("t", "t", "0", num_devices, 1, "", plan_metaops(graph), placed), graph)
