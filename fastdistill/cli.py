"""Command line: `fastdistill info` (also `python -m fastdistill info`)."""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def _info() -> int:
    import fastdistill
    from fastdistill import _C, _library
    from fastdistill.backend import requested_backend, select_backend, triton_installed, triton_interpreter_enabled
    from fastdistill.kernels import registered_kernels

    rows = [
        ("fastdistill", fastdistill.__version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})"),
    ]
    if triton_installed():
        import triton

        rows.append(("triton", f"{triton.__version__} (interpreter {'on' if triton_interpreter_enabled() else 'off'})"))
    else:
        rows.append(("triton", "not installed"))
    cuda_ok = torch.cuda.is_available()
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda_ok else "none"
    rows.append(("CUDA devices", gpus))
    rows.append(("CUDA archs built", _C.cuda_archs or "none (CPU-only build)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")

    print("\nops (torch.ops.fastdistill)     kernels for")
    for name in _library.OP_NAMES:
        print(f"  {name:<30}{', '.join(_library.op_devices(name))}")

    kernels = registered_kernels()
    print(f"\nTriton kernels registered: {len(kernels)}" + (f" ({', '.join(k.name for k in kernels)})" if kernels else ""))

    print(f"\nattention backend (FASTDISTILL_BACKEND={requested_backend()}):")
    for device in ["cpu"] + (["cuda"] if cuda_ok else []):
        try:
            backend, reason = select_backend(device)
            print(f"  {device:<5} tensors -> {backend}  ({reason})")
        except (ValueError, RuntimeError) as exc:
            print(f"  {device:<5} tensors -> error: {exc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, built ops and devices, CUDA archs, Triton and the attention backend")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
