"""Suite-wide setup that must run before any test module is collected."""

import os
import sys

import pytest
import torch

ORACLE_DIR = os.path.join(os.path.dirname(__file__), ".oracle")


def _make_torchvision_importable():
    """torchvision is a test-only oracle (EfficientNetV2-S), installed apart into tests/.oracle by the
    README's test command. The only wheel for torch 2.13 is a CUDA build whose C++ ops do not load
    beside the CPU torch; declaring the two ops its import registers lets the pure-Python model
    definitions import. No test calls those ops. Ordinary processes never see this copy."""
    if not os.path.isdir(ORACLE_DIR):
        return
    sys.path.append(ORACLE_DIR)
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_make_torchvision_importable()

# The tiny test models are far too small for intra-op threads to pay: on a busy 2-core machine
# extra threads make small ops many times slower. One thread keeps the suite fast and stable.
torch.set_num_threads(1)


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """performance.GraphedNetwork on the CPU, with a stand-in for a CUDA graph that behaves like one: a
    replay runs the captured step on the static inputs as they are then and writes into the same output
    tensor. Returns the shapes captured, in order."""
    from wuerstchen_core import performance

    captures = []

    def capture(step, device, pool=None):
        out = step()
        captures.append(tuple(out.shape))
        return out, lambda: out.copy_(step()), pool

    monkeypatch.setattr(performance, "GRAPH_DEVICES", ("cpu",))
    monkeypatch.setattr(performance, "capture_cuda_graph", capture)
    return captures
