"""`fastdistill demo`: distil a teacher into 1-4-step students with every method and measure them.

For a dataset (the 8-mode ring, the 25-mode grid, scikit-learn's 8x8 digits, procedural moving-shapes
videos, or a user's .npy file) the demo trains a teacher (or reuses the one cached in the output
folder), samples a many-step teacher reference (Heun; 64 steps, 16 for images and videos) twice
with different seeds, and distils each method into a student, starting from the teacher's weights.
On videos, Self-Forcing distils the bidirectional teacher into a causal student (ODE-regression
initialisation, then DMD on its own KV-cache rollouts) and reports the streaming latency of every
chunk and the frames per second. It writes DIR/report.json, DIR/report.md and pictures, and prints the table.
Every number is relative to the same run:

  floor      the metric between the two reference sets (what seed noise alone gives)
  teacher    the teacher's Euler sampler at 1, 2, 4, 8 and 32 model calls (NFE) vs the reference
  students   each method at each step count vs the reference

Metrics: sliced Wasserstein (swd) and RBF-MMD^2 (mmd); digits add the Frechet distance (fd) on a
small classifier's features and the classes the samples cover; mixtures add the modes covered.
Deterministic for a seed (CPU); CUDA is used when present.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch

from . import data as datasets
from . import metrics
from ._png import image_grid, scatter_image, write_png
from .distill import (
    DMD2, LCM, RCM, SCM, CausalODEInit, DMD2Config, Diffusion, LCMConfig, RCMConfig, SCMConfig, SelfForcing,
    SelfForcingConfig, Trainer, TrigFlowModel, cosine_schedule,
)
from .distill.denoiser import sigma_max_time
from .models import AdaLNMLP, TinyDiT
from .sampling import (consistency_sample, few_step_times, ode_consistency_function, ode_trajectory, teacher_ode,
                       time_grid)

METHODS = ("scm", "dmd", "rcm", "lcm", "self-forcing")
DEFAULT_METHODS = {"points": ("scm", "dmd", "rcm", "lcm"), "images": ("scm", "dmd", "rcm", "lcm"), "video": ("self-forcing",)}
VIDEO_FRAMES, FRAMES_PER_CHUNK = 4, 1  # the demo's videos and the causal student's chunk (Self-Forcing: 3 latent frames)
TEACHER_NFE = (1, 2, 4, 8, 32)
# The highest frequency of the networks' time embeddings, in rad per unit t (the models' default is
# 64). sCM's tangent holds the network's time derivative, which a high-frequency embedding makes
# rough and, as training moves the weights on those features, unstable (the sCM paper's warning):
# on the ring 1-step sCM went from 0.40 to 0.04 swd at 16; on the digits the JVP's time part swung
# between 1 and 13 in norm from one 100 iterations to the next at 64 (its space part stayed at 2-3)
# and 1-step sCM got worse with more iterations (0.038 -> 0.083 from 500 to 1,100); at 4 it settled
# (0.028 at 500 iterations, 0.026 at 1,000). The videos have no JVP method and keep the default.
TIME_FREQUENCY = {"points": 16.0, "images": 4.0, "video": 64.0}
# Heun steps of the teacher reference (2 steps - 1 model calls). Images: 16 (the digits teacher's
# 32-NFE Euler sampler, first order, is already at the seed floor: 0.021 against 0.021).
REFERENCE_STEPS = {"points": 64, "images": 16, "video": 16}


@dataclass(frozen=True)
class Budget:
    """Sizes of one demo run (see `budget`)."""

    teacher_iterations: int
    student_iterations: int
    batch: int
    eval_samples: int
    width: int = 128
    depth: int = 3
    student_batch: int | None = None  # the distillation batch (None: `batch`; sCM on points: `batch`)


def budget(kind: str, quick: bool) -> Budget:
    """Iterations and sample counts per data kind; --quick fits the whole run in 3 minutes on 2 CPU
    cores, the default in 10. Measured on 2026-11-24, a day training ran 15-20% slower than on
    earlier ones: quick ring / grid / digits / video 142 / 146 / 168 / 66 s (ring 185 s and digits
    184 s before the quick point students trained at batch 256 and the DiT computed its modulations
    once per frame; video 60 s before Self-Forcing's ttur 10); default digits 376 s; earlier,
    before the ideal student: default ring 472 s, video 235 s.
    For videos `student_iterations` is split between Self-Forcing's ODE-regression initialisation
    (a third) and its DMD phase. On points sCM runs 1.5 x `student_iterations` at the full `batch`:
    its step (one JVP and one backward) is among the cheapest and it converges the slowest (grid
    1-step swd 0.053 after 1,000 iterations, 0.045 after 1,500 and 0.039 after 2,000, against a bar
    of 0.050; 0.053 after 1,500 at batch 256). The other quick point students train at batch 256,
    which their 2-3x dearer steps made the largest share of the run: on the grid, seed 0, 1-step
    DMD2 / rCM / LCM 0.034 / 0.034 / 0.041 at 256 against 0.034 / 0.031 / 0.040 at 512."""
    if kind == "points":
        return Budget(2000, 1000, 512, 4000, student_batch=256) if quick else Budget(5000, 3000, 512, 8000)
    if kind == "video":
        return Budget(1500, 300, 32, 256, width=64, depth=2) if quick else Budget(5000, 900, 32, 512, width=64, depth=2)
    # Images: batch 64 and an 800-iteration teacher keep the quick digits run (four methods) within 3
    # minutes (batch 128 and 1,500 took 306 s). 400 student iterations were too few for DMD2's bars.
    # The default keeps the quick run's network (the settings of make_method were tuned on it).
    return Budget(800, 500, 64, 2000, width=64, depth=2) if quick else Budget(2500, 1200, 64, 4000, width=64, depth=2)


# -- data and models ----------------------------------------------------------------------------------
def load_dataset(name: str, seed: int) -> tuple[str, torch.Tensor, dict]:
    """(kind, training data, extras): kind "points" ([N, d]), "images" ([N, 1, H, W]) or "video"
    ([N, 1, T, H, W])."""
    g = torch.Generator().manual_seed(seed)
    if name in ("ring", "grid"):
        mixture = datasets.ring(8) if name == "ring" else datasets.grid(5)
        return "points", mixture.sample(20_000, g), {"mixture": mixture}
    if name == "digits":
        images, labels = datasets.digits()
        return "images", images, {"labels": labels}
    if name == "video":
        return "video", datasets.moving_shapes(4000, frames=VIDEO_FRAMES, size=16, generator=g), {}
    if name.endswith(".npy"):
        array = datasets.load_npy(name)
        if array.dim() == 2:
            return "points", array, {}
        return "images", array.unsqueeze(1), {}
    raise ValueError(f"demo: dataset must be ring, grid, digits, video or a path ending in .npy, got {name!r}")


def make_network(kind: str, sample: torch.Tensor, size: Budget, *, causal: bool = False) -> torch.nn.Module:
    """The demo's network for a data kind: AdaLNMLP for points, TinyDiT (2x2 patches for images, 4x4
    for the 16x16 videos) otherwise; `causal` gives the video student's chunk-causal TinyDiT, which
    has the same parameters as the teacher's."""
    frequency = TIME_FREQUENCY[kind]
    if kind == "points":
        return AdaLNMLP(sample.shape[1], width=size.width, depth=size.depth, time_frequency=frequency)
    heads = max(1, size.width // 16)
    if kind == "video":
        _, c, frames, h, w = sample.shape
        patch = 4 if h % 4 == 0 and w % 4 == 0 else 1
        return TinyDiT(c, h, w, frames=frames, patch=patch, dim=size.width, heads=heads, depth=size.depth,
                       frames_per_chunk=FRAMES_PER_CHUNK if causal else None, time_frequency=frequency)
    _, c, h, w = sample.shape
    patch = 2 if h % 2 == 0 and w % 2 == 0 else 1
    return TinyDiT(c, h, w, patch=patch, dim=size.width, heads=heads, depth=size.depth, time_frequency=frequency)


def dmd_regression_pairs(teacher: TrigFlowModel, noise: torch.Tensor, steps: tuple[int, ...], sigma_max: float):
    """DMD2's regression pairs for a student of several step counts: the teacher's PF-ODE (Heun, 4
    substeps per interval) from noise [M, ...] through every time the student's samplers start a step
    at, to its sample. Returns (states [M, K, ...], times [K], samples [M, ...])."""
    t_max = sigma_max_time(sigma_max, teacher.sigma_d)
    times = sorted({t for k in steps for t in few_step_times(k, t_max)}, reverse=True)
    path = ode_trajectory(teacher.x0, noise, times, substeps=4)  # [K + 1, M, ...]
    return path[:-1].transpose(0, 1).contiguous(), torch.tensor(times, dtype=torch.float64), path[-1]


def make_method(name: str, student: TrigFlowModel, teacher: TrigFlowModel, steps: tuple[int, ...], iterations: int,
                kind: str = "points", regression_pairs: tuple[torch.Tensor, ...] | None = None):
    """The method and its trainer settings used by the demo. Chosen by short sweeps on the ring, the
    grid and the digits at the quick budget, seeds 0 and 1 (notes in the README).

    sCM diverged at lr 5e-4, so 2e-4, with a proposal shifted towards high noise for points (p_mean
    -0.4, p_std 1.6) because one-step sampling starts at t ~ pi/2, and sCM's ImageNet one for images
    (p_mean -0.8: digits 1-step fd 0.72 / 0.97 on seeds 0 / 1 against 0.87 / 1.09 at -0.4, swd
    0.027 / 0.026 against 0.029 / 0.027), tangent normalisation c = 1 and no adaptive weight.
    DMD2: one critic update per generator update (ttur 1), which beat DMD2's ttur 5 at 1,000
    iterations; one student for every requested step count (backward simulation); the batch-wide
    normaliser; the regression loss on `regression_pairs`, the teacher's ODE paths through every step
    time of the samplers (`dmd_regression_pairs`; without it the 2- and 4-step exits collapsed to 16
    and 11 of the grid's 25 modes); a cosine-decayed student lr, 5e-4 for the point MLPs and 2e-3
    with regression weight 4 for the image DiTs (swept with a 1,500-iteration digits teacher: at 5e-4
    and weight 1 the 1-step students ended at 0.026 / 0.032 swd on seeds 0 / 1 against the teacher's
    8-NFE 0.026 / 0.029, at 2e-3 and weight 4 at 0.024 / 0.028). rCM: sCM's settings plus that DMD
    part at weight 1 (the paper's 0.1 with the per-sample normaliser and no regression left the
    1-step students at 0.048 on the grid and 0.046 on the digits against bars of 0.050 and 0.024;
    this gives 0.032 and 0.022) and a cosine lr, 5e-4 (points) / 1e-3 (images). LCM: CD's Heun
    teacher step on a 24-point grid with a 0.9 EMA target (DDIM on 48 points with a 0.95 target:
    1-step 0.076 on the grid and 0.131 with 8 classes on the digits; this: 0.040 and 0.023)."""
    warmup = max(1, iterations // 4)
    points = kind == "points"
    # No adaptive weight (it made the 1-step output swing between 0.09 and 0.58 swd 100 iterations
    # apart) and tangent normalisation g / (|g| + 1): with c = 0.1 the low-dimensional tangents became
    # unit-size pushes that never settle.
    scm_config = SCMConfig(tangent_warmup=warmup, p_mean=-0.4 if points else -0.8, p_std=1.6, tangent_norm=1.0,
                           adaptive_weight=False)
    if name in ("dmd", "rcm") and regression_pairs is None:
        raise ValueError(f"demo: {name} needs regression_pairs (dmd_regression_pairs)")
    dmd_config = DMD2Config(steps=tuple(steps), ttur=1, normaliser="batch", regression_weight=1.0 if points else 4.0)
    if name == "scm":
        return SCM(student, teacher, scm_config), {"lr": 2e-4, "grad_clip": 1.0}
    if name == "dmd":
        method = DMD2(student, teacher, dmd_config, regression_pairs=regression_pairs)
        return method, {"lr": {"student": 5e-4 if points else 2e-3, "critic": 1e-3}, "betas": (0.0, 0.999),
                        "lr_schedule": cosine_schedule(iterations)}
    if name == "rcm":
        # Its DMD part trains the 1-step output only (sCM's loss covers every time; backward simulation
        # cost 15% more time for the same swd), with the regression at every sampler time.
        method = RCM(student, teacher, RCMConfig(scm=scm_config, dmd=replace(dmd_config, steps=1), dmd_weight=1.0),
                     regression_pairs=regression_pairs)
        return method, {"lr": {"student": 5e-4 if points else 1e-3, "critic": 1e-3}, "grad_clip": 1.0,
                        "lr_schedule": cosine_schedule(iterations)}
    if name == "lcm":
        method = LCM(student, teacher, LCMConfig(grid=24, target_decay=0.9, solver="heun"))
        return method, {"lr": 5e-4, "grad_clip": 1.0}
    if name == "self-forcing":
        # Ten critic updates per generator update (DMD2's large-model ttur), a critic lr of 1e-4 and
        # the batch-wide normaliser. On these videos every DMD setting tried moves the student away
        # from its ODE init (and from the data), so this one moves it least: the critic fine-tuned
        # at 4e-4 on batches of 32 drifts from the teacher by more than the student's error (DMD
        # loss ~1 against 0.05 on the digits) and its drift is what the generator follows. Quick,
        # 1-step swd (init 0.121): ttur 1 / 5 with the per-sample normaliser 0.42 / 0.17, with the
        # batch one 0.21 / 0.145; ttur 5 at critic lr 1e-4 0.134, ttur 10 0.128; default budget
        # (init 0.095): 0.34 at ttur 5 and critic lr 4e-4, 0.22 with these settings.
        config = SelfForcingConfig(steps=max(steps), dmd=DMD2Config(ttur=10, normaliser="batch"))
        return SelfForcing(student, teacher, config), {"lr": {"student": 2e-4, "critic": 1e-4}, "betas": (0.0, 0.999)}
    raise ValueError(f"demo: unknown method {name!r}; choose from {', '.join(METHODS)}")


# -- measuring ----------------------------------------------------------------------------------------
class Scorer:
    """Scores sample sets against the reference: swd, mmd (on at most 1,000 samples), and for digits fd
    and classes covered; modes covered for mixtures."""

    def __init__(self, kind: str, reference: torch.Tensor, extras: dict, train: torch.Tensor, seed: int):
        self.kind, self.reference, self.extras = kind, reference.cpu(), extras
        self.classifier = None
        if "labels" in extras:
            self.classifier = metrics.DigitsClassifier.fit(train.cpu(), extras["labels"], seed=seed)
            with torch.no_grad():
                self.reference_features = self.classifier.features(self.reference)

    def __call__(self, samples: torch.Tensor) -> dict:
        samples = samples.cpu()
        row = {"swd": metrics.sliced_wasserstein(samples, self.reference),
               "mmd": metrics.mmd_rbf(samples[:1000], self.reference[:1000])}
        if self.classifier is not None:
            with torch.no_grad():
                row["fd"] = metrics.frechet_distance(self.classifier.features(samples), self.reference_features)
                row["classes"] = metrics.classes_covered(self.classifier.classes(samples))
        if "mixture" in self.extras:
            row["modes"] = self.extras["mixture"].modes_covered(samples)
        return row


def _timed(fn):
    """(result, seconds) of fn() with CUDA synchronised around it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


# -- the run ------------------------------------------------------------------------------------------
def causal_student(teacher: TrigFlowModel, kind: str, train: torch.Tensor, size: Budget) -> TrigFlowModel:
    """The video teacher's weights in the chunk-causal TinyDiT (same parameters, causal attention)."""
    student = TrigFlowModel(make_network(kind, train[:1], size, causal=True), teacher.sigma_d)
    student.load_state_dict(teacher.state_dict())
    return student.to(train.device)


def ode_init(student: TrigFlowModel, teacher: TrigFlowModel, times: list[float], train: torch.Tensor, size: Budget,
             iterations: int, seed: int, progress: bool) -> Trainer:
    """Self-Forcing's initialisation: regress the teacher's ODE endpoints from its states at the causal
    student's step times (4 x batch trajectories, Heun with 2 substeps per interval)."""
    g = torch.Generator(device=train.device).manual_seed(seed * 1000 + 6)
    z = torch.randn((4 * size.batch,) + tuple(train.shape[1:]), generator=g, device=train.device) * teacher.sigma_d
    trajectories = ode_trajectory(teacher.x0, z, times, substeps=2)
    trainer = Trainer(CausalODEInit(student, trajectories, times), lr=5e-4, grad_clip=1.0, seed=seed + 23,
                      log_every=50, progress=progress)
    trainer.fit(train, iterations, size.batch)
    return trainer


def run(dataset: str = "ring", methods: tuple[str, ...] | None = None, steps: tuple[int, ...] = (1, 2, 4), *,
        quick: bool = False, seed: int = 0, out: str = "fastdistill-demo", device: str | None = None,
        log=print, progress: bool = True) -> dict:
    """Run the demo; returns the report (also written to out/report.json and out/report.md).
    methods: None for the dataset's default (sCM, DMD2, rCM, LCM; Self-Forcing on videos)."""
    for m in methods or ():
        if m not in METHODS:
            raise ValueError(f"demo: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if not steps or any(not isinstance(s, int) or s < 1 for s in steps):
        raise ValueError(f"demo: steps must be positive ints, got {steps!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(seed)
    kind, train, extras = load_dataset(dataset, seed)
    methods = DEFAULT_METHODS[kind] if methods is None else tuple(methods)
    if "self-forcing" in methods and kind != "video":
        raise ValueError(f"demo: self-forcing needs videos (--dataset video); {dataset!r} holds {kind}")
    size = budget(kind, quick)
    sigma_d = float(train.std())
    train = train.to(device)
    log(f"fastdistill demo: {dataset} ({kind}, {len(train)} samples, sigma_d {sigma_d:.3f}) on {device}, "
        f"{'quick' if quick else 'default'} budget, seed {seed}")

    # Teacher: trained here, or reused from out/teacher.pt when it was trained with the same settings.
    key = {"dataset": os.path.abspath(dataset) if dataset.endswith(".npy") else dataset, "seed": seed,
           "budget": asdict(size), "sigma_d": sigma_d,
           "time_frequency": TIME_FREQUENCY[kind]}  # not among the saved weights
    teacher = TrigFlowModel(make_network(kind, train[:1], size), sigma_d).to(device)
    cache = os.path.join(out, "teacher.pt")
    cached = torch.load(cache, map_location=device, weights_only=False) if os.path.exists(cache) else None
    if cached is not None and cached.get("key") == key:
        teacher.load_state_dict(cached["state"])
        log("teacher: reused out/teacher.pt")
        teacher_seconds = 0.0
    else:
        log(f"teacher: training {size.teacher_iterations} iterations")
        trainer = Trainer(Diffusion(teacher), lr=2e-3 if kind == "points" else 1e-3, ema_decay=0.995, seed=seed,
                          log_every=100, progress=progress)
        _, teacher_seconds = _timed(lambda: trainer.fit(train, size.teacher_iterations, size.batch))
        teacher = trainer.ema
        torch.save({"key": key, "state": teacher.state_dict()}, cache)
    teacher.requires_grad_(False).eval()

    t_max = Diffusion(teacher).t_max
    shape = (size.eval_samples,) + tuple(train.shape[1:])

    def noise(offset: int, n: int = size.eval_samples) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed * 1000 + offset)
        return torch.randn((n,) + shape[1:], generator=g, device=device) * sigma_d

    def teacher_samples(nfe: int, offset: int, solver: str = "euler"):
        steps_ = nfe if solver == "euler" else (nfe + 1) // 2
        return teacher_ode(teacher.x0, noise(offset), steps_, solver=solver, times=time_grid(steps_, t_max))[0]

    reference_steps = REFERENCE_STEPS[kind]
    log(f"reference: teacher Heun {reference_steps} steps x 2 seeds, {size.eval_samples} samples each")
    reference = teacher_samples(2 * reference_steps - 1, 1, "heun")
    reference_2 = teacher_samples(2 * reference_steps - 1, 2, "heun")
    scorer = Scorer(kind, reference, extras, train if kind == "images" else train[:0], seed)
    floor = scorer(reference_2)
    report = {"dataset": dataset, "kind": kind, "device": str(device), "seed": seed, "quick": quick,
              "budget": asdict(size), "sigma_d": sigma_d, "reference_steps": reference_steps, "floor": floor, "teacher": {}, "students": {},
              "train_seconds": {"teacher": teacher_seconds}}
    pictures = {"reference": reference}
    for nfe in TEACHER_NFE:
        samples, seconds = _timed(lambda: teacher_samples(nfe, 3))
        report["teacher"][str(nfe)] = {**scorer(samples), "sec_per_sample": seconds / size.eval_samples}
        if nfe == 1:
            pictures["teacher_1nfe"] = samples

    if kind != "video":
        # The ideal k-step student: the students' sampler (same noise, same re-noising draws) with the
        # teacher's own PF-ODE as its consistency function, i.e. a perfect distillation. Where the
        # teacher's ODE marginals differ from the noised versions of its samples, re-noising makes even
        # this sampler worse at more steps; students are judged against it (quality_bars). Its first
        # step (the ODE from the same noise at t_max) is the same for every k, so it is solved once.
        exact_f = ode_consistency_function(teacher.x0, reference_steps, t_max)
        z, first_step = noise(5), []

        def ideal_f(x, t):
            if x is z:  # the sampler's first call
                if not first_step:
                    first_step.append(exact_f(x, t))
                return first_step[0]
            return exact_f(x, t)

        report["ideal_student"] = {}
        for k in steps:
            g = torch.Generator(device=device).manual_seed(seed * 1000 + 4)
            samples = consistency_sample(ideal_f, z, few_step_times(k, t_max), g, sigma_d=sigma_d)
            report["ideal_student"][str(k)] = scorer(samples)

    def measure(name: str, sample) -> None:
        """Score `sample(k, generator) -> (samples, timing)` at every step count under students[name]."""
        report["students"][name] = {}
        for k in steps:
            g = torch.Generator(device=device).manual_seed(seed * 1000 + 4)
            (samples, timing), seconds = _timed(lambda: sample(k, g))
            report["students"][name][str(k)] = {**scorer(samples), "sec_per_sample": seconds / size.eval_samples, **timing}
            if k == min(steps):
                pictures[f"{name}_{k}step"] = samples

    def streamed(method, model):
        """Chunk-by-chunk rollout of a causal student: latency per chunk and frames/s."""
        def sample(k, g):
            rollout = method.rollout(noise(5), g, steps=k, student=model, timed=True)
            return rollout.video, {"chunk_ms": [1e3 * c for c in rollout.chunk_seconds],
                                   "frames_per_second": rollout.frames_per_second}
        return sample

    regression_pairs = None
    for name in methods:
        iterations, batch, init_seconds = size.student_iterations, size.student_batch or size.batch, 0.0
        if name == "scm" and kind == "points":  # see `budget`
            iterations, batch = iterations * 3 // 2, size.batch
        if name == "self-forcing":
            # The causal student from the teacher's weights, ODE-regressed on teacher paths (a third of
            # the budget; measured as "ode-init"), then Self-Forcing's DMD on its own rollouts.
            student = causal_student(teacher, kind, train, size).requires_grad_(True).train()
            init_iterations = iterations // 3
            iterations -= init_iterations
            log(f"{name}: ODE-regression initialisation of the causal student, {init_iterations} iterations")
            schedule = SelfForcing(student, teacher, SelfForcingConfig(steps=max(steps)))  # its times and rollout
            _, init_seconds = _timed(lambda: ode_init(student, teacher, schedule.rollout_times(), train, size,
                                                      init_iterations, seed, progress))
            report["train_seconds"]["ode-init"] = init_seconds
            measure("ode-init", streamed(schedule, student))
        else:
            student = copy.deepcopy(teacher).requires_grad_(True).train()
        if name in ("dmd", "rcm") and regression_pairs is None:  # shared by DMD2 and rCM
            regression_pairs = dmd_regression_pairs(teacher, noise(7, 4096 if kind == "points" else 2048), tuple(steps),
                                                    DMD2Config().sigma_max)
        method, settings = make_method(name, student, teacher, tuple(steps), iterations, kind,
                                       regression_pairs=regression_pairs if name in ("dmd", "rcm") else None)
        method.to(device)
        log(f"{name}: distilling {iterations} iterations")
        trainer = Trainer(method, ema_decay=0.99, seed=seed + 17, log_every=100, progress=progress, **settings)
        _, seconds = _timed(lambda: trainer.fit(train, iterations, batch))
        report["train_seconds"][name] = init_seconds + seconds
        if name == "self-forcing":
            measure(name, streamed(method, trainer.ema))
        else:
            measure(name, lambda k, g: (method.sample(noise(5), k, g, student=trainer.ema), {}))
    report["seconds"] = time.perf_counter() - started
    _write(report, pictures, kind, out)
    log(format_table(report))
    return report


# -- output -------------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    """The report as a Markdown table (also what the CLI prints)."""
    columns = [c for c in ("swd", "mmd", "fd", "modes", "classes") if c in report["floor"]]
    streamed = any("frames_per_second" in e for m in report["students"].values() for e in m.values())
    head = "| model | steps (NFE) | " + " | ".join(columns) + " | ms / sample |" + (" ms / chunk | frames / s |" if streamed else "")
    lines = [head, "|" + "---|" * (len(columns) + 3 + 2 * streamed)]

    def row(model, steps, entry):
        cells = []
        for c in columns:
            value = entry.get(c)
            cells.append("" if value is None else (str(value) if isinstance(value, int) else f"{value:.4f}"))
        ms = entry.get("sec_per_sample")
        line = f"| {model} | {steps} | " + " | ".join(cells) + f" | {'' if ms is None else f'{1e3 * ms:.3f}'} |"
        if streamed:
            chunk_ms = entry.get("chunk_ms")
            line += (f" {sum(chunk_ms) / len(chunk_ms):.1f} | {entry['frames_per_second']:.0f} |" if chunk_ms else " | |")
        lines.append(line)

    row("floor (reference vs reference)", "-", report["floor"])
    for nfe, entry in report["teacher"].items():
        row("teacher (Euler)", nfe, entry)
    for k, entry in report.get("ideal_student", {}).items():
        row("ideal student (teacher ODE as f)", k, entry)
    for name, by_steps in report["students"].items():
        for k, entry in by_steps.items():
            row(name, k, entry)
    return "\n".join(lines)


def _write(report: dict, pictures: dict, kind: str, out: str) -> None:
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"# fastdistill demo: {report['dataset']}\n\n"
                f"Seed {report['seed']}, {'quick' if report['quick'] else 'default'} budget, {report['device']}, "
                f"{report['seconds']:.0f} s in all. Metrics against the teacher's Heun-{report['reference_steps']} reference; "
                "the floor is the same metric between two reference sets of different seeds.\n\n")
        f.write(format_table(report) + "\n")
    for name, samples in pictures.items():
        samples = samples.detach().cpu()
        if kind == "points" and samples.shape[1] >= 2:
            extent = float(pictures["reference"][:, :2].abs().max()) * 1.1
            write_png(os.path.join(out, f"{name}.png"), scatter_image(samples, extent))
        elif kind == "images":
            write_png(os.path.join(out, f"{name}.png"), image_grid(samples[:100], 10))
        elif kind == "video":  # frame strips: one video per row
            videos = samples[:8]
            frames = videos.transpose(1, 2).reshape(-1, videos.shape[1], *videos.shape[3:])
            write_png(os.path.join(out, f"{name}.png"), image_grid(frames, videos.shape[2]))


def quality_bars(report: dict, steps: int = 1) -> dict[str, dict[str, bool]]:
    """The notes' bars for each method's `steps`-step student, all relative to this run.

    1 step: excess swd over the floor <= 1/5 of the teacher's 1-NFE excess, swd <= the teacher's 8-NFE
    swd, swd <= 3x the floor; digits: fd <= the teacher's 8-NFE fd.
    k > 1 steps: swd not worse than the 1-step student or the ideal k-step student (the same sampler
    with the teacher's own ODE as f, `report["ideal_student"]`) beyond seed noise, taken as a tenth of
    the floor (on the quick digits the swd of one student over six sampling seeds has a standard
    deviation of 0.001, 5% of the floor, and its fd one of 0.05-0.11, 8-18%); digits: fd <= the
    teacher's 8-NFE fd or the ideal k-step's, with the same allowance. Every step count: digits all
    ten classes, mixtures every mode the reference covers."""
    floor, t1, t8 = report["floor"]["swd"], report["teacher"]["1"]["swd"], report["teacher"]["8"]["swd"]
    ideal = report.get("ideal_student", {}).get(str(steps))
    if steps > 1 and ideal is None:
        raise ValueError(f"quality_bars: {steps}-step bars need the ideal student's {steps}-step entry "
                         f"(report['ideal_student']), which this report lacks")
    bars = {}
    for name, by_steps in report["students"].items():
        if str(steps) not in by_steps:
            continue
        entry = by_steps[str(steps)]
        swd = entry["swd"]
        if steps == 1:
            bar = {"excess <= teacher_1 excess / 5": swd - floor <= (t1 - floor) / 5,
                   "<= teacher 8 NFE": swd <= t8, "<= 3 x floor": swd <= 3 * floor}
        else:
            one = by_steps["1"]["swd"] if "1" in by_steps else float("inf")
            bar = {"<= 1 step or ideal, + floor / 10": swd <= max(one, ideal["swd"]) + floor / 10}
        if "fd" in entry:
            t8_fd = report["teacher"]["8"]["fd"]
            if steps == 1:
                bar["fd <= teacher 8 NFE"] = entry["fd"] <= t8_fd
            else:
                bar["fd <= teacher 8 NFE or ideal, + floor / 10"] = (
                    entry["fd"] <= max(t8_fd, ideal["fd"]) + report["floor"]["fd"] / 10)
        if "classes" in entry:
            bar["all 10 classes"] = entry["classes"] == 10
        if "modes" in entry:
            bar["every reference mode"] = entry["modes"] >= report["floor"]["modes"]
        bars[name] = bar
    return bars


__all__ = ["METHODS", "format_table", "quality_bars", "run"]
