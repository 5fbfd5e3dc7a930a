"""fastdistill: fused kernels and a thin API for diffusion step distillation.

Public API (see README.md):
  rope.RopeSpec, rope_tables, apply_rope   rotary embeddings (1-D and 3-D video), fused op
  kv_write                                 fused RoPE + ring-buffer write of a KV cache
  TileSchedule, chunk_causal_schedule, block_mask_schedule   attention tile schedules
"""

__version__ = "0.1.0"

from . import _library  # noqa: F401  (registers torch.ops.fastdistill)
from . import rope
from .kvcache import kv_write
from .rope import RopeSpec, apply_rope, rope_tables
from .schedule import TileSchedule, block_mask_schedule, chunk_causal_schedule

__all__ = [
    "RopeSpec",
    "TileSchedule",
    "apply_rope",
    "block_mask_schedule",
    "chunk_causal_schedule",
    "kv_write",
    "rope",
    "rope_tables",
]
