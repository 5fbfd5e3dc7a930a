"""Trainer: runs a Method's phases with one optimizer per role.

    trainer = Trainer(method, lr={"student": 1e-4, "critic": 4e-4}, ema_decay=0.999, grad_clip=1.0)
    trainer.fit(data, iterations=10_000, batch_size=256)     # data: [N, ...] tensor or fn(generator, n)
    trainer.save("ckpt.pt"); trainer = Trainer(...); trainer.load("ckpt.pt"); trainer.fit(...)

Per iteration, for each role in `method.phases(iteration)` (TTUR is the method's schedule): zero that
role's gradients, run `accumulation` micro-batches of `method.loss(role, ...)` - each phase draws its
own micro-batches, so a critic phase never accumulates into a generator update or the reverse (TTUR-
aware accumulation) - average the gradients across ranks, clip, step the role's optimizer, then
`method.after_step` and the EMA of the student.

Data parallel: under `torchrun` with an initialised process group (gloo on CPU, NCCL on GPU) the
trainer broadcasts every parameter and buffer from rank 0 at start, gives each rank its own random
stream (seed + rank) and averages each role's gradients with one all-reduce of a flat buffer before
its optimizer steps - the arithmetic of DistributedDataParallel, done here because the methods must
call the *unwrapped* student for torch.func.jvp and run frozen roles without gradient, which DDP's
wrapper hooks get in the way of. FSDP2 sharding is not supported yet.

Random numbers (data picks, noise, times) come from one torch.Generator on the training device; its
state is part of a checkpoint, so a resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .method import Method

DataSource = torch.Tensor | Callable[[torch.Generator, int], torch.Tensor]


class Trainer:
    """method: a Method. lr: one learning rate or {role: lr}; betas: AdamW betas, one pair or {role: pair}
    (DMD2 uses (0, 0.999) for its critic); optimizers: {role: optimizer} to bring your own instead.
    ema_decay: keep `trainer.ema`, an EMA copy of method.student (None: no EMA). grad_clip: max global
    grad norm per role (None: no clipping). accumulation: micro-batches per phase. device: where the
    random stream lives (default: the student's device). progress: print a progress line with the
    losses every `log_every` iterations (rank 0 only)."""

    def __init__(self, method: Method, *, lr: float | dict[str, float] = 1e-4,
                 betas: tuple[float, float] | dict[str, tuple[float, float]] = (0.9, 0.999), weight_decay: float = 0.0,
                 optimizers: dict[str, torch.optim.Optimizer] | None = None, ema_decay: float | None = None,
                 grad_clip: float | None = None, accumulation: int = 1, seed: int = 0, device=None,
                 progress: bool = True, log_every: int = 100):
        if accumulation < 1:
            raise ValueError(f"Trainer: accumulation must be >= 1, got {accumulation}")
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise ValueError(f"Trainer: ema_decay must be in [0, 1), got {ema_decay}")
        self.method = method
        self.roles = method.role_parameters()
        self.device = torch.device(device) if device is not None else next(method.student.parameters()).device
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if self.world > 1:
            with torch.no_grad():
                for tensor in list(method.parameters()) + list(method.buffers()):
                    dist.broadcast(tensor, src=0)
        if optimizers is None:
            optimizers = {}
            for role, params in self.roles.items():
                role_lr = lr[role] if isinstance(lr, dict) else lr
                role_betas = betas[role] if isinstance(betas, dict) else betas
                optimizers[role] = torch.optim.AdamW(params, lr=role_lr, betas=role_betas, weight_decay=weight_decay)
        missing = set(self.roles) - set(optimizers)
        if missing:
            raise ValueError(f"Trainer: no optimizer for roles {sorted(missing)} (method roles: {sorted(self.roles)})")
        self.optimizers = optimizers
        self.ema = copy.deepcopy(method.student).requires_grad_(False) if ema_decay is not None else None
        self.ema_decay, self.grad_clip, self.accumulation = ema_decay, grad_clip, accumulation
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed + self.rank)
        self.iteration = 0
        self.progress, self.log_every = progress, max(1, log_every)
        self.history: list[dict[str, float]] = []

    # -- one iteration --------------------------------------------------------------------------------
    def _batch(self, data: DataSource, batch_size: int) -> torch.Tensor:
        if callable(data):
            return data(self.generator, batch_size)
        pick = torch.randint(len(data), (batch_size,), generator=self.generator, device=self.device)
        return data[pick.to(data.device)].to(self.device)

    def _all_reduce_mean(self, params: list[nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if self.world == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def step(self, data: DataSource, batch_size: int) -> dict[str, torch.Tensor]:
        """One iteration of every phase; returns the detached losses and logs of the last micro-batch."""
        logs: dict[str, torch.Tensor] = {}
        for role in self.method.phases(self.iteration):
            params, optimizer = self.roles[role], self.optimizers[role]
            optimizer.zero_grad(set_to_none=True)
            for _ in range(self.accumulation):
                loss, role_logs = self.method.loss(role, self._batch(data, batch_size), self.iteration, self.generator)
                (loss / self.accumulation).backward()
                logs.update(role_logs)
                logs[f"loss_{role}"] = loss.detach()
            # Gradients a phase left on other roles (e.g. a GAN loss through the critic) are dropped:
            # every phase starts from zero for its own role.
            self._all_reduce_mean(params)
            if self.grad_clip is not None:
                logs[f"grad_norm_{role}"] = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            optimizer.step()
            self.method.after_step(role, self.iteration)
            if role == "student" and self.ema is not None:
                with torch.no_grad():
                    for e, p in zip(self.ema.parameters(), self.method.student.parameters()):
                        e.lerp_(p, 1 - self.ema_decay)
        for params in self.roles.values():  # no stale gradients between iterations
            for p in params:
                p.grad = None
        self.iteration += 1
        return logs

    def fit(self, data: DataSource, iterations: int, batch_size: int) -> list[dict[str, float]]:
        """Run until `iterations` iterations are done in total (a resumed trainer continues)."""
        if not callable(data) and (not isinstance(data, torch.Tensor) or len(data) == 0):
            raise TypeError("Trainer.fit: data must be a non-empty [N, ...] tensor or a function (generator, n) -> batch")
        start, wall = self.iteration, time.perf_counter()
        while self.iteration < iterations:
            logs = self.step(data, batch_size)
            if self.iteration % self.log_every == 0 or self.iteration == iterations:
                row = {"iteration": self.iteration, **{k: float(v) for k, v in logs.items()}}
                self.history.append(row)
                if self.progress and self.rank == 0:
                    rate = (self.iteration - start) / max(time.perf_counter() - wall, 1e-9)
                    bar = _bar(self.iteration / iterations)
                    text = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "iteration")
                    print(f"\r  {bar} {self.iteration}/{iterations} {rate:.1f} it/s  {text}", end="", file=sys.stderr, flush=True)
        if self.progress and self.rank == 0 and iterations > start:
            print(file=sys.stderr)
        return self.history

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "method": self.method.state_dict(),
            "optimizers": {role: opt.state_dict() for role, opt in self.optimizers.items()},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "generator": self.generator.get_state(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["method"])
        for role, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][role])
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError("Trainer.load_state_dict: the checkpoint and this trainer disagree on EMA")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        self.iteration = state["iteration"]
        self.history = list(state["history"])

    def save(self, path) -> None:
        """Write a checkpoint (rank 0 only under data parallel: every rank holds the same weights)."""
        if self.rank == 0:
            torch.save(self.state_dict(), path)

    def load(self, path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))


def _bar(fraction: float, width: int = 20) -> str:
    filled = min(width, int(math.floor(fraction * width)))
    return "[" + "#" * filled + "." * (width - filled) + "]"
