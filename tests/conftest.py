import os

import torch

# Set before any Triton kernel is defined (triton.jit reads it at decoration time): without a GPU the
# Triton kernels run under the interpreter; outputs are NaN-poisoned so unwritten elements show.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTDISTILL_POISON_OUTPUTS", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` compare CUDA results with CPU results; without a CUDA device they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
