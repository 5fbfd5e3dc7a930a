"""Command line (also `python -m fastdistill ...`):

  fastdistill demo [--dataset ring|grid|digits|video|PATH.npy] [--methods scm,dmd,rcm,lcm|self-forcing] [--steps 1,2,4]
                   [--quick] [--seed N] [--out DIR] [--device cpu|cuda]
  fastdistill info
"""

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


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _demo(args) -> int:
    from fastdistill import demo

    methods = None if args.methods is None else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods or () if m not in demo.METHODS]
    if unknown or methods == ():
        print(f"fastdistill demo: --methods must be a comma-separated subset of {','.join(demo.METHODS)}, got {args.methods!r}",
              file=sys.stderr)
        return 2
    if not (args.dataset in ("ring", "grid", "digits", "video") or args.dataset.endswith(".npy")):
        print(f"fastdistill demo: --dataset must be ring, grid, digits, video or a .npy file, got {args.dataset!r}", file=sys.stderr)
        return 2
    if methods and "self-forcing" in methods and args.dataset != "video":
        print(f"fastdistill demo: self-forcing needs --dataset video, got --dataset {args.dataset}", file=sys.stderr)
        return 2
    report = demo.run(args.dataset, methods, args.steps, quick=args.quick, seed=args.seed, out=args.out,
                      device=args.device, progress=sys.stderr.isatty())
    print(f"\nwrote {args.out}/report.json, report.md and pictures ({report['seconds']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdistill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, built ops and devices, CUDA archs, Triton and the attention backend")
    demo = sub.add_parser("demo", help="distil a teacher with every method on a toy or user dataset and report quality")
    demo.add_argument("--dataset", default="ring",
                      help="ring, grid, digits, video (moving shapes), or a .npy file of N x d points or N x H x W images")
    demo.add_argument("--methods", default=None,
                      help="comma-separated subset of scm,dmd,rcm,lcm,self-forcing (default: the first four; self-forcing alone for video)")
    demo.add_argument("--steps", type=_int_list, default=(1, 2, 4), help="student step counts, e.g. 1,2,4")
    demo.add_argument("--quick", action="store_true", help="smaller budget: about 3 minutes on 2 CPU cores")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="fastdistill-demo", help="output folder (report.json, report.md, pictures)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "demo":
        return _demo(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
