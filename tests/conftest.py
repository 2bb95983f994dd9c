import os

import pytest

SLOW = bool(os.environ.get("ONNXPRUNE_SLOW"))
# every pass that changes a graph is followed by a check of what it declares (sorted, inputs
# defined): a broken pass fails where it broke the graph (onnxprune/pipeline.py)
os.environ.setdefault("ONNXPRUNE_CHECK_PASSES", "1")


def pytest_collection_modifyitems(config, items):
    if SLOW:
        return
    skip = pytest.mark.skip(reason="slow: set ONNXPRUNE_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
