"""Denoiser networks of the demo and the tests; any nn.Module with forward(x, t) -> F works with
fastdistill.distill.

  AdaLNMLP   points [N, d]
  TinyDiT    images [N, C, H, W] and videos [N, C, T, H, W]; causal mode with RollingKVCache rollout
"""

from .dit import TinyDiT
from .mlp import AdaLNMLP, TimeEmbedding

__all__ = ["AdaLNMLP", "TimeEmbedding", "TinyDiT"]
