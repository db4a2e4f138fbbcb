"""Classification losses as nn.Modules, for configs and the detection RoI head.

Every module is called as `loss(logits, labels)` with foreground classes 0..C-1 and background C
(the convention of gumbel_kernels.gol_loss), and says how wide its head is (`num_logits(C)`:
C for the 1203-way heads, C + 1 for the heads with a background column) and how to turn logits
into scores at inference (`activation`: "gumbel", "sigmoid" or "softmax").
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .functional import DEFAULT_CLAMP, DEFAULT_LAMBDA, drop_classes_from_frequency, gol_loss


class FusedGOLLoss(nn.Module):
    """gumbel_kernels.gol_loss with fixed settings, over a 1203-way (C-way) head.

    Args:
        drop_classes: (C,) bool mask of the rare classes (None: nothing dropped).
        mode, activation, clamp, grad_mode, backend: as in gumbel_kernels.gol_loss.
    """

    def __init__(self, drop_classes: Optional[torch.Tensor] = None, *, mode: str = "droploss",
                 activation: str = "gumbel", clamp: Optional[Tuple] = DEFAULT_CLAMP,
                 grad_mode: str = "reference", backend: str = "auto"):
        super().__init__()
        if drop_classes is not None:
            drop_classes = torch.as_tensor(drop_classes, dtype=torch.bool)
        self.register_buffer("drop_classes", drop_classes, persistent=False)
        self.mode = mode
        self.activation = activation
        self.clamp = clamp if activation == "gumbel" else None
        self.grad_mode = grad_mode
        self.backend = backend

    def num_logits(self, num_classes: int) -> int:
        return num_classes

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, *,
                class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return gol_loss(logits, labels, self.drop_classes, mode=self.mode,
                        activation=self.activation, clamp=self.clamp, grad_mode=self.grad_mode,
                        class_weight=class_weight, backend=self.backend)

    def extra_repr(self) -> str:
        dropped = 0 if self.drop_classes is None else int(self.drop_classes.sum())
        return (f"mode={self.mode!r}, activation={self.activation!r}, clamp={self.clamp}, "
                f"grad_mode={self.grad_mode!r}, drop_classes={dropped}")


def _drop_classes(image_counts, num_images, lambda_) -> torch.Tensor:
    if image_counts is None or num_images is None:
        raise ValueError("this loss needs the training set's per-class image_counts and "
                         "num_images to find its rare classes")
    return drop_classes_from_frequency(image_counts, num_images, lambda_)


class GOLLoss(FusedGOLLoss):
    """Gumbel Optimized Loss: Gumbel activation + DropLoss weights (the GOL default).

    Args:
        image_counts: (C,) number of training images per class (LVIS `image_count`).
        num_images: number of training images.
        lambda_: rare-class frequency threshold (0.0011 for LVIS v1).
    """

    def __init__(self, image_counts: Sequence[int], num_images: int,
                 lambda_: float = DEFAULT_LAMBDA, *, activation: str = "gumbel",
                 mode: str = "droploss", **kwargs):
        super().__init__(_drop_classes(image_counts, num_images, lambda_), mode=mode,
                         activation=activation, **kwargs)


class DropLoss(GOLLoss):
    """DropLoss (Hsieh et al., AAAI 2021): sigmoid activation with the DropLoss weights."""

    def __init__(self, image_counts: Sequence[int], num_images: int,
                 lambda_: float = DEFAULT_LAMBDA, **kwargs):
        kwargs.setdefault("activation", "sigmoid")
        super().__init__(image_counts, num_images, lambda_, mode="droploss", **kwargs)


class EQLLoss(GOLLoss):
    """Equalization Loss (Tan et al., CVPR 2020): rare-class negatives ignored on foreground RoIs."""

    def __init__(self, image_counts: Sequence[int], num_images: int,
                 lambda_: float = DEFAULT_LAMBDA, **kwargs):
        kwargs.setdefault("activation", "sigmoid")
        super().__init__(image_counts, num_images, lambda_, mode="eql", **kwargs)


class SigmoidBCELoss(FusedGOLLoss):
    """Sigmoid binary cross-entropy over a C-way head (background rows: all negative)."""

    def __init__(self, **kwargs):
        super().__init__(None, mode="bce", activation="sigmoid", **kwargs)


class GumbelBCELoss(FusedGOLLoss):
    """Gumbel activation with plain binary cross-entropy over a C-way head (paper Table 1)."""

    def __init__(self, **kwargs):
        super().__init__(None, mode="bce", activation="gumbel", **kwargs)


class GumbelCELoss(FusedGOLLoss):
    """GOL's GumbelCE: a (C+1)-way head whose last column is background, trained with Gumbel BCE.

    Labels keep the C = background convention: label C is the positive of the background column.
    """

    def __init__(self, **kwargs):
        super().__init__(None, mode="bce", activation="gumbel", **kwargs)

    def num_logits(self, num_classes: int) -> int:
        return num_classes + 1


class SoftmaxCELoss(nn.Module):
    """torchvision's default: softmax cross-entropy over a (C+1)-way head, background = C."""

    activation = "softmax"

    def num_logits(self, num_classes: int) -> int:
        return num_classes + 1

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)


LOSS_NAMES = ("softmax", "sigmoid", "gumbel", "eql", "droploss", "gol", "gumbel_ce")


def build_classification_loss(name: str, image_counts: Optional[Sequence[int]] = None,
                              num_images: Optional[int] = None, **kwargs) -> nn.Module:
    """The classification loss of a config by name (see LOSS_NAMES).

    "gol" is Gumbel + DropLoss, "droploss" and "eql" are the sigmoid methods, "gumbel" is Gumbel
    BCE, "gumbel_ce" the (C+1)-way GumbelCE; "eql", "droploss" and "gol" need the class
    frequencies (image_counts, num_images) and accept lambda_.
    """
    if name == "softmax":
        return SoftmaxCELoss()
    if name == "sigmoid":
        return SigmoidBCELoss(**kwargs)
    if name == "gumbel":
        return GumbelBCELoss(**kwargs)
    if name == "gumbel_ce":
        return GumbelCELoss(**kwargs)
    if name == "eql":
        return EQLLoss(image_counts, num_images, **kwargs)
    if name == "droploss":
        return DropLoss(image_counts, num_images, **kwargs)
    if name == "gol":
        return GOLLoss(image_counts, num_images, **kwargs)
    raise ValueError(f"unknown classification loss {name!r}; expected one of "
                     f"{', '.join(LOSS_NAMES)}")
