"""Trainer(shard="fsdp2"): FSDP2 (torch.distributed.fsdp.fully_shard) on two gloo processes against the
flat all-reduce data parallel, and its checkpoints against single-process and data-parallel trainers.

The workers start from different weights and see different data per rank, so a sharding bug (a shard
taken before the rank-0 broadcast, gradients not averaged, a stale gathered parameter, the wrong
shard updated, a JVP through a sharded module seeing DTensors) shows up as ranks that disagree or as
a difference from the flat data parallel, which does the same arithmetic without sharding. float64:
the two differ only by reassociation (a module called twice reduce-scatters twice; clipping sums
per-shard norms), far below the 1e-9 tolerance.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from fastdistill import data
from fastdistill.distill import (
    DMD2, LCM, RCM, SCM, DMD2Config, LCMConfig, RCMConfig, SCMConfig, SelfForcing, SelfForcingConfig, Trainer,
    TrigFlowModel,
)
from fastdistill.models import AdaLNMLP, TinyDiT

SIGMA_D = 0.7
SETTINGS = dict(lr={"student": 1e-2, "critic": 2e-2}, ema_decay=0.9, grad_clip=1.0, accumulation=2, seed=0, progress=False)
TOL = dict(rtol=1e-9, atol=1e-12)


def _method(name: str, seed: int):
    torch.manual_seed(seed)
    teacher = TrigFlowModel(AdaLNMLP(2, width=16, depth=1), SIGMA_D)
    for p in teacher.parameters():  # non-zero modulation: time enters the block, the JVP is non-trivial
        nn.init.normal_(p, std=0.3)
    student = copy.deepcopy(teacher).requires_grad_(True)
    if name == "scm":  # its tangent runs torch.func.jvp through the sharded student.net
        method = SCM(student, teacher, SCMConfig(tangent_warmup=2))
    elif name == "dmd2":  # multi-step backward simulation: the student's call count differs between ranks
        method = DMD2(student, teacher, DMD2Config(steps=(1, 2), ttur=2, gan_weight=1e-2))
    elif name == "rcm":  # one student shared by the nested sCM and DMD2 parts
        method = RCM(student, teacher, RCMConfig(scm=SCMConfig(tangent_warmup=2)))
    else:  # the target, a frozen copy, follows the student by EMA in after_step
        method = LCM(student, teacher, LCMConfig(grid=12))
    return method.double()


def _self_forcing(seed: int):
    torch.manual_seed(seed)
    teacher = TrigFlowModel(TinyDiT(1, 4, 4, frames=4, patch=2, dim=12, heads=2, depth=1), SIGMA_D)
    for p in teacher.parameters():
        nn.init.normal_(p, std=0.3)
    student = TrigFlowModel(TinyDiT(1, 4, 4, frames=4, patch=2, dim=12, heads=2, depth=1, frames_per_chunk=1), SIGMA_D)
    student.load_state_dict(teacher.state_dict())
    return SelfForcing(student, teacher, SelfForcingConfig(steps=2, dmd=DMD2Config(ttur=2))).double()


def _settings(name):
    return {**SETTINGS, "lr": SETTINGS["lr"]["student"]} if name in ("scm", "lcm") else SETTINGS


def _full(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, gathered (collective under FSDP2), in named_parameters order."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in module.named_parameters()}


def _worker(rank, world, tmp):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2's note on .squeeze outputs
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        train = data.ring(4).sample(256, torch.Generator().manual_seed(100 + rank), dtype=torch.float64)
        out = {}
        for name in ("dmd2", "scm", "rcm", "lcm"):
            flat = Trainer(_method(name, seed=rank), **_settings(name))
            flat.fit(train, 4, 16)
            method = _method(name, seed=rank)  # another init per rank: the trainer must broadcast rank 0's
            sharded = Trainer(method, shard="fsdp2", **_settings(name))
            weight = method.student.net.embed.weight
            assert isinstance(weight, DTensor) and weight.to_local().shape[0] == weight.shape[0] // world
            assert isinstance(method.teacher.net.embed.weight, DTensor)  # the frozen teacher is sharded too
            assert all(isinstance(p, DTensor) for params in sharded.roles.values() for p in params)
            sharded.fit(train, 4, 16)
            z = torch.randn(8, 2, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
            samples = {}
            for key, trainer in (("flat", flat), ("fsdp", sharded)):  # every rank samples: all-gathers
                samples[key] = trainer.method.sample(z, 2, torch.Generator().manual_seed(3))
                samples[key + "_ema"] = trainer.method.sample(z, 2, torch.Generator().manual_seed(3), student=trainer.ema)
            out[name] = {"samples": samples, "flat": _full(flat.method), "flat_ema": _full(flat.ema),
                         "fsdp": _full(sharded.method), "fsdp_ema": _full(sharded.ema),
                         "start": _full(_method(name, seed=0))}
            sharded.save(f"{tmp}/{name}_fsdp.pt")  # collective: every rank calls save
            if name == "dmd2":
                flat.save(f"{tmp}/dmd2_flat.pt")
                out["dmd2"]["fsdp_state"] = sharded.state_dict()  # rank 0: full tensors, others: empty
        # Self-Forcing: the causal student's cache rollout calls net.forward_chunk (registered as an FSDP
        # forward method), a random exit step per rank, and a whole-video teacher.
        videos = torch.randn(16, 1, 4, 4, 4, generator=torch.Generator().manual_seed(200 + rank), dtype=torch.float64)
        runs = {}
        for shard in (None, "fsdp2"):
            method = _self_forcing(seed=rank)
            trainer = Trainer(method, shard=shard, **SETTINGS)
            trainer.fit(videos, 3, 2)
            runs[shard] = _full(trainer.method)
        out["self-forcing"] = {"flat": runs[None], "fsdp": runs["fsdp2"], "start": _full(_self_forcing(seed=0))}
        dist.barrier()
        method = _method("scm", seed=0)  # an optimizer built before sharding holds the replaced parameters
        with pytest.raises(ValueError, match=r"optimizers\['student'\] holds parameters that are not the sharded"):
            Trainer(method, shard="fsdp2", optimizers={"student": torch.optim.SGD(method.parameters(), lr=0.1)})
        # A flat data-parallel checkpoint loads into an FSDP2 trainer: its gathered state is the file's.
        into_fsdp = Trainer(_method("dmd2", seed=7), shard="fsdp2", **SETTINGS)
        into_fsdp.load(f"{tmp}/dmd2_flat.pt")
        out["flat_into_fsdp"] = into_fsdp.state_dict()
        if rank == 1:  # its state_dict() is empty: loading it must fail loudly, not load nothing
            with pytest.raises(ValueError, match="holds no model tensors"):
                into_fsdp.load_state_dict(out["flat_into_fsdp"])
        # FSDP2 resume: 2 iterations, save, load into fresh FSDP2 and flat trainers (different inits), go on to 4.
        half = Trainer(_method("dmd2", seed=rank), shard="fsdp2", **SETTINGS)
        half.fit(train, 2, 16)
        half.save(f"{tmp}/half.pt")
        dist.barrier()
        for shard in ("fsdp2", None):
            resumed = Trainer(_method("dmd2", seed=11 + rank), shard=shard, **SETTINGS)
            resumed.load(f"{tmp}/half.pt")
            resumed.fit(train, 4, 16)
            out[f"resumed_{shard}"] = {"method": _full(resumed.method), "ema": _full(resumed.ema)}
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _assert_same(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=lambda m: f"{key}: {m}", **(tol or dict(rtol=0, atol=0)))


def _assert_state_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_state_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_state_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(_worker, args=(2, str(tmp)), nprocs=2, start_method="spawn")
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", ["dmd2", "scm", "rcm", "lcm"])
def test_fsdp2_ranks_agree_and_match_the_flat_data_parallel(runs, name):
    _, ranks = runs
    r0, r1 = ranks[0][name], ranks[1][name]
    _assert_same(r0["fsdp"], r1["fsdp"])  # gathered full parameters identical on both ranks
    _assert_same(r0["fsdp_ema"], r1["fsdp_ema"])
    _assert_same(r0["flat"], r1["flat"])
    _assert_same(r0["fsdp"], r0["flat"], **TOL)  # the sharded run is the flat data parallel
    _assert_same(r0["fsdp_ema"], r0["flat_ema"], **TOL)
    for rank in (r0, r1):  # sampling through the sharded student and EMA (each rank its own noise)
        _assert_same({k: v for k, v in rank["samples"].items() if k.startswith("fsdp")},
                     {k.replace("flat", "fsdp"): v for k, v in rank["samples"].items() if k.startswith("flat")}, **TOL)
    trained = [k for k in r0["fsdp"] if not torch.equal(r0["fsdp"][k], r0["start"][k])]
    assert any("student." in k for k in trained)  # it did train (rCM names its student scm.student)
    frozen = [k for k in r0["fsdp"] if "teacher." in k]
    assert frozen
    _assert_same({k: r0["fsdp"][k] for k in frozen}, {k: r0["start"][k] for k in frozen})  # rank 0's teacher, untouched


def test_fsdp2_self_forcing_rollout_through_the_sharded_causal_student(runs):
    _, ranks = runs
    r0, r1 = ranks[0]["self-forcing"], ranks[1]["self-forcing"]
    _assert_same(r0["fsdp"], r1["fsdp"])
    _assert_same(r0["fsdp"], r0["flat"], **TOL)
    assert any("student." in k and not torch.equal(r0["fsdp"][k], r0["start"][k]) for k in r0["fsdp"])


def test_fsdp2_checkpoint_resumes_under_fsdp2_and_flat_data_parallel(runs):
    _, ranks = runs
    want = ranks[0]["dmd2"]
    for rank in ranks:
        _assert_same(rank["resumed_fsdp2"]["method"], want["fsdp"])  # per-rank random streams restored: exact
        _assert_same(rank["resumed_fsdp2"]["ema"], want["fsdp_ema"])
        _assert_same(rank["resumed_None"]["method"], want["fsdp"], **TOL)
        _assert_same(rank["resumed_None"]["ema"], want["fsdp_ema"], **TOL)


def test_flat_checkpoint_loads_into_fsdp2_and_round_trips(runs):
    tmp, ranks = runs
    flat = torch.load(tmp / "dmd2_flat.pt", weights_only=False)
    got = ranks[0]["flat_into_fsdp"]
    assert "generators" in got and ranks[1]["flat_into_fsdp"]["method"] == {}  # only rank 0 holds tensors
    for key in ("iteration", "method", "optimizers", "ema", "generator", "history"):
        _assert_state_equal(got[key], flat[key])


def test_fsdp2_checkpoint_loads_into_a_single_process_trainer(runs):
    tmp, ranks = runs
    state = torch.load(tmp / "dmd2_fsdp.pt", weights_only=False)
    single = Trainer(_method("dmd2", seed=5), **SETTINGS)
    single.load(tmp / "dmd2_fsdp.pt")
    _assert_same(_full(single.method), ranks[0]["dmd2"]["fsdp"])
    _assert_same(_full(single.ema), ranks[0]["dmd2"]["fsdp_ema"])
    mine = single.state_dict()
    for key in ("iteration", "method", "optimizers", "ema", "generator", "history"):
        _assert_state_equal(mine[key], state[key])  # the single-process format, optimizer state included
    _assert_state_equal(ranks[0]["dmd2"]["fsdp_state"]["optimizers"], state["optimizers"])
    single.fit(data.ring(4).sample(64, torch.Generator().manual_seed(0), dtype=torch.float64), 5, 16)
    assert single.iteration == 5


def test_fsdp2_argument_errors():
    method = _method("scm", seed=0)
    with pytest.raises(ValueError, match="shard must be None .* got 'fsdp'"):
        Trainer(method, shard="fsdp", progress=False)
    with pytest.raises(ValueError, match="shard='fsdp2' needs an initialised process group"):
        Trainer(method, shard="fsdp2", progress=False)
    with pytest.raises(ValueError, match="mesh is only used with shard='fsdp2'"):
        Trainer(method, mesh=object(), progress=False)
    with pytest.raises(TypeError, match=r"optimizers\['student'\] must be a torch.optim.Optimizer or a factory"):
        Trainer(method, optimizers={"student": 0.1}, progress=False)
    trainer = Trainer(method, optimizers={"student": lambda params: torch.optim.SGD(params, lr=0.5)}, progress=False)
    assert isinstance(trainer.optimizers["student"], torch.optim.SGD)
