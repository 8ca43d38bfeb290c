"""Every test here starts processes (torchrun ranks or spawned gloo workers): marked ``slow``."""

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/distributed/" in str(item.path):
            item.add_marker(pytest.mark.slow)
