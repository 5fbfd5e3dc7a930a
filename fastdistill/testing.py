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


class CopyCounter:
    """Count the bytes that copying ops read out of watched tensors, and the host syncs, while a block runs.

        with CopyCounter(watch=[cache.k_buffer, cache.v_buffer]) as counter:
            cache.attend(layer, q, k, v)
        counter.copy_bytes, counter.host_syncs

    copy_bytes sums the sizes of torch's copying ops (copy_, clone, cat, stack, index_select,
    index_copy, gather, dtype/device conversions) that read a tensor sharing storage with a watched
    one; writes *into* a watched tensor are not copies of it. fastdistill's own ops (kv_write, rope,
    the attention kernels) read in place and are never counted. host_syncs counts reads of a tensor's
    value on the host (`.item()`, `int(t)`, `bool(t)`: aten._local_scalar_dense), which on CUDA wait
    for the device. A TorchDispatchMode, so it works on any device; only meaningful outside the
    Triton interpreter (which copies kernel arguments itself).
    """

    _COPY_OPS = ("copy_", "clone", "cat", "stack", "index_select", "index_copy", "index_copy_", "gather",
                 "_to_copy", "slice_scatter")

    def __init__(self, watch=()):
        self._storages = {t.untyped_storage().data_ptr() for t in watch}
        self.copy_bytes = 0
        self.host_syncs = 0

    def _reads_watched(self, tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors
                   if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self._storages)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name == "_local_scalar_dense":
                    counter.host_syncs += 1
                elif name in CopyCounter._COPY_OPS:
                    sources = args[1:2] if name == "copy_" else [
                        t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])]
                    counter.copy_bytes += counter._reads_watched(sources)
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False
