"""Distillation methods and their trainer (notes/distillation.md has the formulas).

  TrigFlowModel, RectifiedFlowTeacher, EDMTeacher, EpsTeacher   models and teacher adapters (TrigFlow time)
  ClassifierFreeGuidance, guided                                CFG with an explicit convention
  Diffusion                                                     teacher training (denoising loss)
  SCM, RCM, LCM, DMD2                                           the methods; configs are dataclasses
  SelfForcing, CausalODEInit                                    causal video students (KV-cache rollouts)
  Trainer, cosine_schedule                                      per-role optimizers, TTUR, EMA, LR schedule, checkpoints
"""

from .denoiser import (
    ClassifierFreeGuidance,
    Denoiser,
    EDMTeacher,
    EpsTeacher,
    RectifiedFlowTeacher,
    TrigFlowModel,
    denoising_loss,
    guided,
)
from .diffusion import Diffusion, DiffusionConfig
from .dmd import DMD2, DMD2Config, dmd_gradient, dmd_loss
from .lcm import LCM, LCMConfig
from .method import Method
from .rcm import RCM, RCMConfig
from .scm import SCM, SCMConfig
from .self_forcing import CausalODEInit, SelfForcing, SelfForcingConfig
from .trainer import Trainer, cosine_schedule

__all__ = [
    "CausalODEInit", "ClassifierFreeGuidance", "DMD2", "DMD2Config", "Denoiser", "Diffusion", "DiffusionConfig", "EDMTeacher",
    "EpsTeacher", "LCM", "LCMConfig", "Method", "RCM", "RCMConfig", "RectifiedFlowTeacher", "SCM", "SCMConfig",
    "SelfForcing", "SelfForcingConfig", "Trainer", "TrigFlowModel", "cosine_schedule", "denoising_loss", "dmd_gradient", "dmd_loss", "guided",
]
