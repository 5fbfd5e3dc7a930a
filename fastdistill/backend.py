"""Backend selection for the attention kernels (DESIGN.md section 2).

FASTDISTILL_BACKEND = auto (default) | triton | reference. `auto` runs the Triton kernels on CUDA
tensors and the pure-PyTorch reference on everything else; `triton` forces Triton (on CPU tensors this
needs TRITON_INTERPRET=1, which is how the tests exercise the kernels without a GPU); `reference`
forces the reference. Both backends compute the same function, so the choice never changes results
beyond floating-point rounding.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "reference")


def requested_backend() -> str:
    """The value of FASTDISTILL_BACKEND, validated."""
    value = os.environ.get("FASTDISTILL_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FASTDISTILL_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def select_backend(device: torch.device | str) -> tuple[str, str]:
    """(backend, reason) for attention on tensors of `device`."""
    device = torch.device(device)
    requested = requested_backend()
    if requested == "reference":
        return "reference", "FASTDISTILL_BACKEND=reference"
    if requested == "triton":
        if device.type != "cuda" and not triton_interpreter_enabled():
            raise ValueError(
                f"FASTDISTILL_BACKEND=triton on {device} tensors needs TRITON_INTERPRET=1 (Triton kernels run on CUDA)"
            )
        return "triton", "FASTDISTILL_BACKEND=triton" + (" (interpreter)" if device.type != "cuda" else "")
    if device.type == "cuda":
        if not triton_installed():
            raise RuntimeError("fastdistill needs triton for CUDA tensors; pip install triton")
        return "triton", "auto: CUDA tensors run the Triton kernels"
    return "reference", f"auto: {device.type} tensors run the PyTorch reference"
