import os

import pytest

SLOW = bool(os.environ.get("ONNXPRUNE_SLOW"))


def pytest_collection_modifyitems(config, items):
    if SLOW:
        return
    skip = pytest.mark.skip(reason="slow: set ONNXPRUNE_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
