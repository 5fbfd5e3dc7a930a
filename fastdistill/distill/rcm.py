"""rCM: the sCM loss regularised by DMD (arXiv 2510.08431): sCM keeps the student's samples diverse
(forward divergence, mode covering), the DMD term sharpens them (reverse divergence), with a fake-score
critic trained on the student's samples, updated `ttur` times per student update.

Roles: "student" (sCM loss + dmd_weight * DMD loss on one-step student samples) and "critic".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field


from .denoiser import Denoiser, TrigFlowModel
from .dmd import DMD2, DMD2Config
from .method import Method
from .scm import SCM, SCMConfig


@dataclass
class RCMConfig:
    scm: SCMConfig = field(default_factory=SCMConfig)
    dmd: DMD2Config = field(default_factory=lambda: DMD2Config(ttur=1))
    dmd_weight: float = 0.1


class RCM(Method):
    def __init__(self, student: TrigFlowModel, teacher: Denoiser, config: RCMConfig | None = None, *,
                 regression_pairs=None):
        """regression_pairs: DMD2's (with config.dmd.regression_weight > 0; see DMD2)."""
        super().__init__()
        self.config = config or RCMConfig()
        self.scm = SCM(student, teacher, self.config.scm)
        # The DMD part shares the student and teacher; it owns the critic.
        self.dmd = DMD2(student, teacher, self.config.dmd, critic=copy.deepcopy(teacher),
                        regression_pairs=regression_pairs)
        self.student, self.teacher = student, teacher
        self.sigma_max = self.config.scm.sigma_max

    def role_parameters(self):
        return {"student": self.scm.role_parameters()["student"], "critic": self.dmd.role_parameters()["critic"]}

    def phases(self, iteration):
        return self.dmd.phases(iteration)

    def loss(self, role, x0, iteration, generator):
        if role == "critic":
            return self.dmd.critic_loss(x0, iteration, generator)
        if role != "student":
            raise ValueError(f"RCM.loss: unknown role {role!r}")
        scm_loss, logs = self.scm.consistency_loss(x0, iteration, generator)
        dmd_loss, dmd_logs = self.dmd.generator_loss(x0, iteration, generator)
        logs.update(dmd_logs)
        return scm_loss + self.config.dmd_weight * dmd_loss, logs
