"""Triton kernels, one op per file, and the registry that `benchmarks/kernel_report.py` reads.

Every Triton kernel module registers each kernel with the configurations it may launch, marking the
ones the launcher uses by default. The kernel report compiles every registered configuration ahead of
time for sm_90 and sm_80 (no GPU needed) and fails when a *default* configuration spills registers, so
a kernel that would be slow or fail to compile on an H100 cannot land unnoticed.

Registering is cheap and import-time only: it keeps references to the `@triton.jit` functions and the
constexpr values; nothing is compiled until the report (or a launch) asks for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of a kernel.

    constexprs: values of the kernel's `tl.constexpr` parameters (tile sizes, head dim, flags).
    default:    True when the launcher picks this configuration without autotuning; the report fails
                when a default configuration spills.
    """

    name: str
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    default: bool = False


@dataclass(frozen=True)
class KernelEntry:
    """A registered Triton kernel.

    fn:        the `@triton.jit` function.
    signature: Triton types of the runtime parameters for ahead-of-time compilation, e.g.
               {"q_ptr": "*fp16", "seq_len": "i32", "scale": "fp32"}; constexpr parameters are
               listed with the value "constexpr" and take their values from each config.
    configs:   the configurations the launcher may use.
    hints:     the specializations Triton's launcher makes at run time for the inputs the kernel is
               built for, so the ahead-of-time compile matches a real launch: 1 = the argument equals
               1 (compiled as a constant, e.g. the unit stride of the head dim), 16 = it is divisible
               by 16 (16-byte-aligned pointers, row strides of 16-multiple head dims).
    """

    name: str
    fn: Any
    signature: dict[str, str]
    configs: tuple[KernelConfig, ...] = field(default_factory=tuple)
    hints: dict[str, int] = field(default_factory=dict)


_REGISTRY: dict[str, KernelEntry] = {}


def register_kernel(entry: KernelEntry) -> KernelEntry:
    """Add a kernel to the registry (called at import time by the module that defines it)."""
    if entry.name in _REGISTRY:
        raise ValueError(f"a Triton kernel named {entry.name!r} is already registered")
    if not entry.configs:
        raise ValueError(f"kernel {entry.name!r} registers no configuration")
    _REGISTRY[entry.name] = entry
    return entry


def registered_kernels() -> list[KernelEntry]:
    """All registered kernels, in registration order.

    Importing this package imports every kernel module, so the list is complete.
    """
    return list(_REGISTRY.values())


POISON_ENV = "FASTDISTILL_POISON_OUTPUTS"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh output buffer with NaN when FASTDISTILL_POISON_OUTPUTS=1 (the tests set it), so an
    element a kernel forgets to write shows up as NaN instead of passing on stale memory."""
    if os.environ.get(POISON_ENV) == "1":
        t.fill_(float("nan"))
    return t


# Importing the package registers every kernel (the kernel report relies on it).
from . import attn_bwd, attn_fwd, attn_jvp  # noqa: E402,F401
