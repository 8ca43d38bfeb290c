"""Test helper: place unplaced waves naively and run the plan validator on the result."""

from spindle.graph import MetaGraph
from spindle.placement import place_naive
from spindle.plan import Plan, plan_metaops, validate_plan
from spindle.schedule import WaveSpec


def validate_placed(waves: list[WaveSpec], graph: MetaGraph, num_devices: int) -> None:
    placed = tuple(place_naive(waves, num_devices))
    validate_plan(Plan("t", "t", "0", num_devices, 1, "", plan_metaops(graph), placed), graph)
