"""gumbel-kernels: fused kernels for the Gumbel Optimized Loss (GOL, ECCV 2022).

The public names of the API contract (shared SPEC.md, section 5); the loss modules used by
configs live in `gumbel_kernels.losses`, the detection harness in its own subpackages.
"""
from . import _ops  # noqa: F401  (registers fake kernels and autograd of torch.ops.gumbel)
from .functional import drop_classes_from_frequency, gol_loss, gumbel_activation

__all__ = ["gol_loss", "gumbel_activation", "drop_classes_from_frequency"]
__version__ = "0.1.0"
