"""Tolerance helpers shared by the tests and the benchmarks.

Low-precision results follow FlashAttention's rule: the kernel's error against a float64 reference
may be at most `factor` times (2x for outputs, 3x for gradients) the error of a same-dtype PyTorch
implementation of the same math, plus a small floor for results that PyTorch happens to get exact.
"""

from __future__ import annotations

import torch

# Floors per dtype: a few units in the last place at magnitude ~1.
ERROR_FLOOR = {
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 2e-6,
    torch.float64: 1e-12,
}


def max_abs_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.to(torch.float64) - reference.to(torch.float64)).abs().max().item() if actual.numel() else 0.0


def assert_error_within(
    actual: torch.Tensor,
    reference: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    factor: float = 2.0,
    floor: float | None = None,
    name: str = "output",
) -> None:
    """Assert max|actual - reference| <= factor * max|baseline - reference| + floor.

    reference: the float64 oracle. baseline: the same computation done by PyTorch in actual's dtype
    (omit it to compare against the floor alone). floor defaults to ERROR_FLOOR[actual.dtype].
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference shape {tuple(reference.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: contains NaN or inf")
    err = max_abs_error(actual, reference)
    base = max_abs_error(baseline, reference) if baseline is not None else 0.0
    tol = factor * base + (ERROR_FLOOR[actual.dtype] if floor is None else floor)
    if err > tol:
        raise AssertionError(
            f"{name} ({actual.dtype}): max error {err:.3e} > {factor} x baseline error {base:.3e} + floor = {tol:.3e}"
        )
