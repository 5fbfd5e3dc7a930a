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
wrapper hooks get in the way of.

FSDP2: `Trainer(method, ..., shard="fsdp2")` (process group required; gloo on CPU, NCCL on GPU) applies
torch.distributed.fsdp.fully_shard, after the rank-0 broadcast (so the shards come from one init), to
every model of the method - student, critic, GAN head, sCM's weight head, LCM's target and the frozen
teacher - each `nn.ModuleList` element (the blocks) as a unit of its own. A wrapper without
parameters of its own is looked through (TrigFlowModel -> net): sCM's tangent calls `student.net`
under torch.func.jvp, and that call runs fully_shard's hooks (all-gather, then compute on plain
tensors), so the JVP works on the sharded student unchanged - nothing is wrapped, unlike DDP. The
teacher is sharded too: it is often the largest model of the run (DMD2 holds teacher, critic and
student), and memory is why one shards; the price is an all-gather per teacher call. Trainable
models keep their gathered parameters from their first call in a phase until their backward (or
the phase's end): DMD2's backward simulation calls the student a random, per-rank number of times,
and every all-gather is a collective. Frozen models reshard after each call, so a method must call
them equally often on every rank (all methods here do). FSDP2's reduce-scatter averages the
gradients (no flat all-reduce); the optimizers, gradient clipping (a global norm over the DTensor
shards) and the EMA (a sharded copy of the student) work on the shards. Every rank must call what
runs a sharded model: `step`/`fit`, `method.sample`, `state_dict`/`save`. Checkpoints hold full
(unsharded) CPU tensors in the single-process format (torch.distributed.checkpoint.state_dict with
full_state_dict=True; optimizer state renumbered by parameter order), so an FSDP2 checkpoint loads
into a single-process or flat data-parallel trainer and the reverse.

Random numbers (data picks, noise, times) come from one torch.Generator on the training device; its
state is part of a checkpoint, so a resumed run reproduces the uninterrupted one exactly (under the
flat data parallel rank 0 alone writes the file, so only rank 0's stream is saved; FSDP2 checkpoints
hold every rank's).
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
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class Trainer:
    """method: a Method. lr: one learning rate or {role: lr}; betas: AdamW betas, one pair or {role: pair}
    (DMD2 uses (0, 0.999) for its critic); optimizers: {role: optimizer} to bring your own instead.
    ema_decay: keep `trainer.ema`, an EMA copy of method.student (None: no EMA). grad_clip: max global
    grad norm per role (None: no clipping). accumulation: micro-batches per phase. device: where the
    random stream lives (default: the student's device). progress: print a progress line with the
    losses every `log_every` iterations (rank 0 only). shard: None (replicate: single process or flat
    all-reduce data parallel) or "fsdp2" (fully_shard every parameter-holding module of the method;
    module docstring); mesh: the DeviceMesh to shard over (default: all ranks, 1-D). With "fsdp2",
    `optimizers` values must be factories params -> optimizer (they are built on the sharded
    parameters); factories work without sharding too. lr_schedule: a function iteration -> factor;
    each iteration's learning rates are the optimizers' initial ones times lr_schedule(iteration)
    (e.g. `cosine_schedule(iterations)`; None: constant). It is a function of the iteration alone,
    so a resumed run follows the same schedule."""

    def __init__(self, method: Method, *, lr: float | dict[str, float] = 1e-4,
                 betas: tuple[float, float] | dict[str, tuple[float, float]] = (0.9, 0.999), weight_decay: float = 0.0,
                 optimizers: dict[str, torch.optim.Optimizer | OptimizerFactory] | None = None, ema_decay: float | None = None,
                 grad_clip: float | None = None, accumulation: int = 1, seed: int = 0, device=None,
                 progress: bool = True, log_every: int = 100, shard: str | None = None, mesh=None,
                 lr_schedule: Callable[[int], float] | None = None):
        if shard not in (None, "fsdp2"):
            raise ValueError(f"Trainer: shard must be None (replicated) or 'fsdp2', got {shard!r}")
        if mesh is not None and shard is None:
            raise ValueError("Trainer: mesh is only used with shard='fsdp2', got shard=None")
        if accumulation < 1:
            raise ValueError(f"Trainer: accumulation must be >= 1, got {accumulation}")
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise ValueError(f"Trainer: ema_decay must be in [0, 1), got {ema_decay}")
        self.method, self.shard = method, shard
        self.device = torch.device(device) if device is not None else next(method.student.parameters()).device
        distributed = dist.is_available() and dist.is_initialized()
        if shard == "fsdp2" and not distributed:
            raise ValueError("Trainer: shard='fsdp2' needs an initialised process group (torchrun and "
                             "torch.distributed.init_process_group), found none")
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1
        if self.world > 1:
            with torch.no_grad():
                for tensor in list(method.parameters()) + list(method.buffers()):
                    dist.broadcast(tensor, src=0)
        self.ema = copy.deepcopy(method.student).requires_grad_(False) if ema_decay is not None else None
        self.mesh, self._units = None, []  # the fully_shard units of the method (FSDP2)
        if shard == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = mesh if mesh is not None else init_device_mesh(self.device.type, (self.world,))
            self._units = [unit for module in _shard_roots(method) for unit in _fully_shard(module, self.mesh)]
            if self.ema is not None:
                _fully_shard(_descend(self.ema), self.mesh)
        self.roles = method.role_parameters()
        if shard == "fsdp2":
            from torch.distributed.tensor import DTensor

            for role, params in self.roles.items():
                ids = {id(p) for p in params}
                plain = [name for name, p in method.named_parameters() if id(p) in ids and not isinstance(p, DTensor)]
                if plain:
                    raise ValueError(f"Trainer: shard='fsdp2' left role {role!r} parameters unsharded: {plain[:3]} "
                                     "(parameters must live in submodules of the method, not on the method itself)")
        if optimizers is not None:
            optimizers = dict(optimizers)
            for role, opt in optimizers.items():
                if not isinstance(opt, torch.optim.Optimizer):
                    if not callable(opt):
                        raise TypeError(f"Trainer: optimizers[{role!r}] must be a torch.optim.Optimizer or a factory "
                                        f"params -> Optimizer, got {type(opt).__name__}")
                    if role in self.roles:
                        optimizers[role] = opt(self.roles[role])
            if shard == "fsdp2":
                for role, opt in optimizers.items():
                    current = {id(p) for p in self.roles.get(role, [])}
                    if any(id(p) not in current for group in opt.param_groups for p in group["params"]):
                        raise ValueError(f"Trainer: optimizers[{role!r}] holds parameters that are not the sharded "
                                         f"parameters of role {role!r}; with shard='fsdp2' pass a factory, e.g. "
                                         "{role: lambda params: torch.optim.SGD(params, lr=...)}")
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
        if lr_schedule is not None and not callable(lr_schedule):
            raise TypeError(f"Trainer: lr_schedule must be a function iteration -> factor, got {type(lr_schedule).__name__}")
        self.lr_schedule = lr_schedule
        self._base_lrs = {role: [group["lr"] for group in opt.param_groups] for role, opt in optimizers.items()}
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
        if self.lr_schedule is not None:
            factor = float(self.lr_schedule(self.iteration))
            for role, optimizer in self.optimizers.items():
                for group, base in zip(optimizer.param_groups, self._base_lrs[role]):
                    group["lr"] = base * factor
        for role in self.method.phases(self.iteration):
            params, optimizer = self.roles[role], self.optimizers[role]
            optimizer.zero_grad(set_to_none=True)
            for micro in range(self.accumulation):
                # FSDP2: accumulate unsharded gradients locally, reduce-scatter once after the last.
                for unit in self._units:
                    unit.set_requires_gradient_sync(micro == self.accumulation - 1, recurse=False)
                loss, role_logs = self.method.loss(role, self._batch(data, batch_size), self.iteration, self.generator)
                (loss / self.accumulation).backward()
                logs.update(role_logs)
                logs[f"loss_{role}"] = loss.detach()
            # Gradients a phase left on other roles (e.g. a GAN loss through the critic) are dropped:
            # every phase starts from zero for its own role.
            if self.shard is None:
                self._all_reduce_mean(params)
            else:  # FSDP2's reduce-scatter has averaged them; drop gathered copies before the step
                self._reshard()
            if self.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                logs[f"grad_norm_{role}"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
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

    def _reshard(self) -> None:
        """FSDP2: register the sharded parameters again (the optimizer, clipping, EMA and checkpoints
        work on them) and free the gathered ones, which an optimizer step would make stale."""
        for unit in self._units:
            unit.reshard()

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
        """The checkpoint. With shard="fsdp2" it is collective (every rank must call it) and only rank
        0's copy holds the tensors (full, on CPU; the other ranks' method/optimizer/EMA entries are
        empty); its format is the single-process one, plus "generators": every rank's random stream."""
        if self.shard is None:
            return {
                "iteration": self.iteration,
                "method": self.method.state_dict(),
                "optimizers": {role: opt.state_dict() for role, opt in self.optimizers.items()},
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "generator": self.generator.get_state(),
                "history": self.history,
            }
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self._reshard()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        generators = [None] * self.world
        dist.all_gather_object(generators, self.generator.get_state())
        return {
            "iteration": self.iteration,
            "method": get_model_state_dict(self.method, options=options),
            "optimizers": {role: self._full_optimizer_state(opt, options) for role, opt in self.optimizers.items()},
            "ema": get_model_state_dict(self.ema, options=options) if self.ema is not None else None,
            "generator": self.generator.get_state(),  # rank 0 writes the file: rank 0's
            "generators": generators,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a checkpoint of any trainer of this method (single process, data parallel or FSDP2).
        With shard="fsdp2" every rank calls it with the full checkpoint. A checkpoint with every rank's
        random stream ("generators", FSDP2's) restores each rank's own when the world size matches;
        otherwise every rank takes the saved "generator" (rank 0's)."""
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError("Trainer.load_state_dict: the checkpoint and this trainer disagree on EMA")
        if self.shard is None:
            self.method.load_state_dict(state["method"])
            for role, opt in self.optimizers.items():
                opt.load_state_dict(state["optimizers"][role])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            if not state["method"] and next(self.method.parameters(), None) is not None:
                raise ValueError("Trainer.load_state_dict: the checkpoint holds no model tensors (under shard='fsdp2' "
                                 "only rank 0's state_dict() does); give every rank the full checkpoint, e.g. load(path)")
            self._reshard()
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.method, state["method"], options=options)
            for role, opt in self.optimizers.items():
                self._load_full_optimizer_state(opt, state["optimizers"][role], options)
            if self.ema is not None:
                set_model_state_dict(self.ema, state["ema"], options=options)
        generators = state.get("generators")
        self.generator.set_state(generators[self.rank] if generators and len(generators) == self.world else state["generator"])
        self.iteration = state["iteration"]
        self.history = list(state["history"])

    # Optimizer state in the single-process format (parameters numbered in param_group order),
    # converted from and to torch.distributed.checkpoint's FQN-keyed full state.
    def _optimizer_fqns(self, opt: torch.optim.Optimizer) -> list[str]:
        names = {id(p): name for name, p in self.method.named_parameters()}  # first name of a shared parameter
        return [names[id(p)] for group in opt.param_groups for p in group["params"]]

    def _full_optimizer_state(self, opt: torch.optim.Optimizer, options) -> dict:
        if not opt.state:  # nothing to gather (and DCP would initialise the state with a dummy step)
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(self.method, opt, options=options)
        if not full:  # not rank 0
            return {}
        index = {fqn: i for i, fqn in enumerate(self._optimizer_fqns(opt))}
        return {"state": {index[fqn]: value for fqn, value in full["state"].items()},
                "param_groups": [{**group, "params": [index[fqn] for fqn in group["params"]]} for group in full["param_groups"]]}

    def _load_full_optimizer_state(self, opt: torch.optim.Optimizer, state: dict, options) -> None:
        if not state["state"]:
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        fqns = self._optimizer_fqns(opt)
        if len(fqns) != sum(len(group["params"]) for group in state["param_groups"]):
            raise ValueError(f"Trainer.load_state_dict: the checkpoint's optimizer has "
                             f"{sum(len(g['params']) for g in state['param_groups'])} parameters, this one {len(fqns)}")
        keyed = {"state": {fqns[i]: value for i, value in state["state"].items()},
                 "param_groups": [{**group, "params": [fqns[i] for i in group["params"]]} for group in state["param_groups"]]}
        set_optimizer_state_dict(self.method, opt, keyed, options=options)

    def save(self, path) -> None:
        """Write a checkpoint (rank 0 writes: under data parallel every rank holds the same weights).
        With shard="fsdp2" every rank must call save (gathering the shards is collective)."""
        if self.shard is not None:
            state = self.state_dict()
            if self.rank == 0:
                torch.save(state, path)
        elif self.rank == 0:
            torch.save(self.state_dict(), path)

    def load(self, path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))


# -- FSDP2 -------------------------------------------------------------------------------------------
def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _descend(module: nn.Module) -> nn.Module:
    """The module to shard for a model: through wrappers with no parameters of their own and one
    parameter-holding child (TrigFlowModel -> its net, CFG -> teacher -> model), so that calling the
    inner network directly - sCM's JVP calls student.net - still runs fully_shard's hooks."""
    while next(module.parameters(recurse=False), None) is None:
        holders = [child for child in module.children() if _holds_parameters(child)]
        if len(holders) != 1:
            break
        module = holders[0]
    return module


def _shard_roots(method: nn.Module) -> list[nn.Module]:
    """The models of a method (nested methods such as rCM's sCM and DMD2 parts searched through), each
    shared model once, as the modules fully_shard is applied to."""
    roots: list[nn.Module] = []
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if id(child) in seen or not _holds_parameters(child):
                continue
            seen.add(id(child))
            if isinstance(child, Method):
                visit(child)
                continue
            root = _descend(child)
            if any(id(m) in seen for m in root.modules() if m is not child):
                raise ValueError(f"Trainer: shard='fsdp2' cannot shard {type(root).__name__}: it shares "
                                 "submodules with another model of the method")
            seen.update(id(m) for m in root.modules())
            roots.append(root)

    visit(method)
    return roots


def _fully_shard(module: nn.Module, mesh) -> list[nn.Module]:
    """fully_shard each element of the module's ModuleLists (the blocks), then the module; returns the
    units (FSDPModules). A trainable model keeps its gathered parameters from its first call in a phase
    until its backward or the phase's end: the number of calls may differ between ranks (DMD2's
    backward simulation draws its step count per rank), and each all-gather is a collective every rank
    must join. Frozen models (teacher, LCM target, EMA) reshard after every call: they must be called
    equally often on every rank. Gradients are summed, then divided by the world size: the flat
    all-reduce's arithmetic, so the two modes agree to rounding."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    trainable = any(p.requires_grad for p in module.parameters())
    for sub in list(module.modules()):
        if isinstance(sub, nn.ModuleList):
            for block in sub:
                if _holds_parameters(block):
                    fully_shard(block, mesh=mesh, reshard_after_forward=not trainable)
    fully_shard(module, mesh=mesh, reshard_after_forward=not trainable)
    if callable(getattr(module, "forward_chunk", None)):  # a causal TinyDiT's cache rollout (Self-Forcing)
        register_fsdp_forward_method(module, "forward_chunk")
    units = [m for m in module.modules() if hasattr(m, "set_requires_gradient_sync")]
    for unit in units:
        unit.set_force_sum_reduction_for_comms(True)
    return units


def cosine_schedule(iterations: int, final: float = 0.0) -> Callable[[int], float]:
    """A Trainer lr_schedule: the factor falls from 1 at iteration 0 to `final` at `iterations` along
    half a cosine, and stays at `final` after."""
    if iterations < 1 or not 0 <= final <= 1:
        raise ValueError(f"cosine_schedule: iterations must be >= 1 and final in [0, 1], got {iterations} and {final}")

    def factor(iteration: int) -> float:
        progress = min(iteration, iterations) / iterations
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _bar(fraction: float, width: int = 20) -> str:
    filled = min(width, int(math.floor(fraction * width)))
    return "[" + "#" * filled + "." * (width - filled) + "]"
