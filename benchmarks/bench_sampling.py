"""Few-step sampling at DiT scale: the teacher's ODE sampler at many model calls (NFE) against a 1-,
2- and 4-step student, latency per batch and speed-up.

Model: fastdistill.models.TinyDiT at DiT-XL/2 size (dim 1152, 28 blocks, 16 heads, 2x2 patches) on
4 x 32 x 32 latents (a 256 px image through an SD-style VAE: 256 tokens), attention through
fastdistill.attention, in a TrigFlowModel; the network in bf16, the sampler's state (x, the
re-noising draws, the ODE update) in float32; batch 16 (and batch 1: the latency of one image).
The weights are random (drawn at std 0.02 so every block is active; the adaLN-Zero init would make
each block the identity): time does not depend on them, and the student has the teacher's
architecture, as a distilled student does.

Providers (one sampling call from noise to the sample, end to end):
  teacher Euler N NFE          fastdistill.sampling.teacher_ode, N = 8, 32, 50           [baselines]
  student k step(s)            fastdistill.sampling.consistency_sample at the few-step times
                               (the sCM / rCM / LCM / DMD2 sampler), k = 1, 2, 4
Speed-up = baseline ms / provider ms (> 1: faster); it should be close to the NFE ratio, since both
samplers are one network call per NFE plus elementwise work.

Correctness first: every provider's output is compared with the same sampler, from the same noise
and re-noising draws, with the network in float32; it passes at a relative RMS error <= 0.1 (bf16
through 28 random blocks). A wrong provider is not timed.

--smoke (CPU): a TinyDiT of width 64, 2 blocks, 8 x 8 latents, batch 4, the network in float32
against float64 (state in float64); checks the bench runs, not speed.

  python benchmarks/bench_sampling.py [--smoke] [--reps N] [--no-save]      (default --reps 10 on CUDA)
"""

from __future__ import annotations

import datetime
import json
import sys

import torch
from harness import RESULTS_DIR, environment, parse_args, time_ms

from fastdistill.distill import TrigFlowModel
from fastdistill.distill.denoiser import sigma_max_time
from fastdistill.models import TinyDiT
from fastdistill.sampling import consistency_sample, few_step_times, teacher_ode, time_grid

TEACHER_NFE = (8, 32, 50)
STUDENT_STEPS = (1, 2, 4)
SIGMA_D = 0.5
FULL = dict(channels=4, size=32, dim=1152, depth=28, heads=16, batches=(1, 16), dtype=torch.bfloat16,
            check_dtype=torch.float32, rtol=0.1)
SMOKE = dict(channels=1, size=8, dim=64, depth=2, heads=4, batches=(4,), dtype=torch.float32,
             check_dtype=torch.float64, rtol=1e-4)


def make_model(config: dict, device: str) -> TrigFlowModel:
    torch.manual_seed(0)
    net = TinyDiT(config["channels"], config["size"], config["size"], patch=2, dim=config["dim"],
                  heads=config["heads"], depth=config["depth"])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    return TrigFlowModel(net, SIGMA_D).to(device).eval()


def in_dtype(model: TrigFlowModel, dtype: torch.dtype):
    """x0_fn running the network in `dtype` and returning the sampler's dtype."""
    return lambda x, t: model.x0(x.to(dtype), t.to(dtype)).to(x.dtype)


def samplers(t_max: float) -> dict[str, tuple[callable, bool]]:
    """name -> (fn(x0_fn, z) -> samples, is_baseline)."""
    out = {}
    for nfe in TEACHER_NFE:
        grid = time_grid(nfe, t_max)
        out[f"teacher Euler {nfe} NFE"] = (lambda f, z, g=grid, n=nfe: teacher_ode(f, z, n, times=g)[0], True)
    for k in STUDENT_STEPS:
        times = few_step_times(k, t_max)
        out[f"student {k} step{'s' if k > 1 else ''}"] = (
            lambda f, z, ts=times: consistency_sample(f, z, ts, torch.Generator(z.device).manual_seed(1),
                                                      sigma_d=SIGMA_D), False)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(__doc__, argv)
    if not args.smoke and "--reps" not in argv:
        args.reps = 10  # a 50-NFE teacher call is ~1 s at batch 16: 100 reps would not fit the GPU check
    config = SMOKE if args.smoke else FULL
    device = args.device
    model = make_model(config, device)
    state = config["check_dtype"] if args.smoke else torch.float32
    check = in_dtype(make_model(config, device).to(config["check_dtype"]), config["check_dtype"])
    fast = in_dtype(model.to(config["dtype"]), config["dtype"])
    t_max = sigma_max_time(80.0, SIGMA_D)
    env = environment(device)
    rows, ok = [], True
    for batch in config["batches"]:
        params = {"batch": batch, "tokens": (config["size"] // 2) ** 2, "dim": config["dim"], "depth": config["depth"],
                  "dtype": str(config["dtype"]).removeprefix("torch.")}
        z = torch.randn(batch, config["channels"], config["size"], config["size"],
                        generator=torch.Generator().manual_seed(2)).to(device, state) * SIGMA_D
        results = []
        for name, (fn, baseline) in samplers(t_max).items():
            res = {"provider": name, "baseline": baseline, "ms": None}
            with torch.no_grad():
                want = fn(check, z).double()
                got = fn(fast, z).double()
            rel = float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-30))
            res["rel_rms_err"], res["correct"] = rel, bool(rel <= config["rtol"])
            if res["correct"]:
                with torch.no_grad():
                    times = torch.tensor(time_ms(lambda: fn(fast, z), device, args.warmup, args.reps))
                p20, ms, p80 = times.quantile(torch.tensor([0.2, 0.5, 0.8], dtype=times.dtype)).tolist()
                res.update(ms=ms, ms_p20=p20, ms_p80=p80, ms_per_sample=ms / batch)
            ok &= res["correct"]
            results.append(res)
        baselines = {r["provider"]: r["ms"] for r in results if r["baseline"]}
        for res in results:
            res["speedup"] = {b: base / res["ms"] if base and res["ms"] else None for b, base in baselines.items()}
            rows.append((params, res))
    print(_table(rows, env, args.smoke, list(baselines)), flush=True)
    if args.save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(RESULTS_DIR / "sampling.jsonl", "a") as f:
            for params, res in rows:
                f.write(json.dumps({"timestamp": stamp, "bench": "sampling", "params": params, **res, **env,
                                    "smoke": args.smoke}) + "\n")
    return 0 if ok else 1


def _table(rows, env, smoke: bool, baselines: list[str]) -> str:
    head = ["batch", "provider", "check (rel rms)", "ms", "p20-p80 ms", "ms / sample", *(f"x vs {b}" for b in baselines)]
    lines = [head]
    for params, r in rows:
        fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
        lines.append([str(params["batch"]), r["provider"], f"{'ok' if r['correct'] else 'WRONG'} ({r['rel_rms_err']:.1e})",
                      fmt(r["ms"], ".3f"), "-" if r["ms"] is None else f"{r['ms_p20']:.3f}-{r['ms_p80']:.3f}",
                      fmt(r.get("ms_per_sample"), ".3f"), *(fmt(r["speedup"][b], ".2f") for b in baselines)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    params = rows[0][0]
    title = (f"== sampling on {env['device']}: TinyDiT dim {params['dim']} x {params['depth']} blocks, {params['tokens']} "
             f"tokens, {params['dtype']} (torch {env['torch']}, commit {env['git_commit'][:12]}) ==")
    if smoke:
        title += "\nCPU smoke run: timings are NOT meaningful; this run checks the bench only."
    return "\n".join([title, *("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)])


if __name__ == "__main__":
    sys.exit(main())
