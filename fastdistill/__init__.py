"""fastdistill: fused kernels and a thin API for diffusion step distillation.

Public API (see README.md):
  attention, explain                       attention with masks (Triton on CUDA, reference on CPU)
  attention_jvp                            attention and its forward-mode derivative in one pass
  masks                                    full, causal, chunk_causal, block_sparse, topk_blocks, `&`
  sdpa, patch_sdpa                         drop-in F.scaled_dot_product_attention and a patch for it
  rope.RopeSpec, rope_tables, apply_rope   rotary embeddings (1-D and 3-D video), fused op
  RollingKVCache                           streaming chunk-causal attention over per-layer ring buffers
  kv_write                                 fused RoPE + ring-buffer write of a KV cache
  TileSchedule, chunk_causal_schedule, block_mask_schedule   attention tile schedules

Subpackages imported on demand: fastdistill.distill (sCM, DMD2, rCM, LCM, Trainer), fastdistill.models
(AdaLNMLP, TinyDiT), fastdistill.sampling, fastdistill.data, fastdistill.metrics, fastdistill.demo.
"""

__version__ = "0.1.0"

from . import _library  # noqa: F401  (registers torch.ops.fastdistill)
from . import masks, rope
from .attention import attention, attention_jvp, explain  # the function shadows the submodule name, as intended
from .sdpa import patch_sdpa, sdpa
from .kvcache import RollingKVCache, kv_write
from .rope import RopeSpec, apply_rope, rope_tables
from .schedule import TileSchedule, block_mask_schedule, chunk_causal_schedule

__all__ = [
    "RollingKVCache",
    "RopeSpec",
    "attention",
    "attention_jvp",
    "explain",
    "masks",
    "patch_sdpa",
    "sdpa",
    "TileSchedule",
    "apply_rope",
    "block_mask_schedule",
    "chunk_causal_schedule",
    "kv_write",
    "rope",
    "rope_tables",
]
