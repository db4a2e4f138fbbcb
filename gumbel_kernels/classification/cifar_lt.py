"""Long-tailed image classification data: CIFAR-100-LT and a generated stand-in.

CIFAR-100-LT (Cao et al., NeurIPS 2019; the GOL paper's Table 4 uses imbalance factors 50, 100,
200) is built from a local CIFAR-100 copy in torchvision's format (`root/cifar-100-python/`,
read with `torchvision.datasets.CIFAR100(root, download=False)`; nothing is downloaded):

    n_i = floor(n_max * (1 / imbalance) ** (i / (C - 1))),   i = 0 .. C-1,  n_max = 500

and the training set keeps the *first* n_i images of class i in the order of the CIFAR-100
training file (deterministic, no random draw). Imbalance 100 gives 10847 images, from 500
(class 0) down to 5 (class 99). The test set is the full, balanced CIFAR-100 test set
(100 per class).

`SyntheticLTClassification` generates a data set with the same shape of tail (same profile
formula) when no copy exists, and for the tests: small RGB images whose class is a fixed random
low-resolution colour pattern (its prototype), shown at a random shift and brightness under
Gaussian noise. A balanced test split (`test_per_class` per class) comes from the same
prototypes. Deterministic given the seed.

Evaluation groups (by the number of *training* images of a class): many (> 100), medium
(20 - 100), few (< 20).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["long_tail_counts", "long_tail_indices", "LTClassificationData",
           "SyntheticLTClassification", "load_cifar100_lt", "cifar100_available",
           "class_groups", "GROUPS"]

GROUPS = ("many", "medium", "few")


def long_tail_counts(num_classes: int, imbalance: float, n_max: int = 500) -> List[int]:
    """n_i = floor(n_max * (1 / imbalance) ** (i / (C - 1))) for i = 0 .. C-1.

    The exponential profile of CIFAR-LT: n_0 = n_max, n_{C-1} = floor(n_max / imbalance)
    (never below 1, which only matters when n_max < imbalance).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not imbalance >= 1:
        raise ValueError(f"imbalance must be >= 1, got {imbalance!r}")
    if not isinstance(n_max, int) or n_max < 1:
        raise ValueError(f"n_max must be a positive int, got {n_max!r}")
    if num_classes == 1:
        return [n_max]
    ratio = 1.0 / float(imbalance)
    return [max(1, int(math.floor(n_max * ratio ** (i / (num_classes - 1)))))
            for i in range(num_classes)]


def long_tail_indices(targets: Sequence[int], counts: Sequence[int]) -> torch.Tensor:
    """Indices (ascending) of the first counts[i] samples of each class i, in dataset order."""
    targets = torch.as_tensor(targets, dtype=torch.int64)
    keep = []
    for cls, n in enumerate(counts):
        members = torch.nonzero(targets == cls).flatten()
        if members.numel() < n:
            raise ValueError(f"class {cls} has {members.numel()} samples, the profile asks for {n}")
        keep.append(members[:n])
    return torch.sort(torch.cat(keep)).values if keep else torch.zeros(0, dtype=torch.int64)


def class_groups(class_counts: Sequence[int]) -> Dict[str, List[int]]:
    """Class indices per group: many (> 100 training images), medium (20-100), few (< 20)."""
    groups: Dict[str, List[int]] = {g: [] for g in GROUPS}
    for cls, n in enumerate(class_counts):
        groups["many" if n > 100 else "few" if n < 20 else "medium"].append(cls)
    return groups


@dataclass
class LTClassificationData:
    """A long-tailed training split and a balanced test split, as uint8 (N, 3, H, W) tensors."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    name: str
    imbalance: float
    class_counts: List[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.class_counts:
            self.class_counts = torch.bincount(self.train_labels,
                                               minlength=self.num_classes).tolist()

    def channel_stats(self):
        """(mean, std) per channel of the training images, in [0, 1] units, shape (3,)."""
        x = self.train_images.to(torch.float32) / 255.0
        return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp(min=1e-3)

    def summary(self) -> str:
        groups = class_groups(self.class_counts)
        return (f"{self.name}: {len(self.train_labels)} training images over {self.num_classes} "
                f"classes ({self.class_counts[0]} -> {self.class_counts[-1]} per class, imbalance "
                f"{self.imbalance:g}; many/medium/few classes {len(groups['many'])}/"
                f"{len(groups['medium'])}/{len(groups['few'])}), {len(self.test_labels)} test "
                f"images")


class SyntheticLTClassification(LTClassificationData):
    """A generated long-tailed classification set (see the module docstring).

    Args:
        num_classes, imbalance, n_max: the long-tail profile (long_tail_counts).
        test_per_class: balanced test images per class.
        image_size: side of the square RGB images.
        pattern_size: resolution of the class prototypes (upsampled to image_size).
        noise: standard deviation of the pixel noise, in [0, 1] units.
        seed: everything is drawn from a torch.Generator with this seed.
    """

    def __init__(self, num_classes: int = 100, imbalance: float = 100.0, n_max: int = 500, *,
                 test_per_class: int = 100, image_size: int = 32, pattern_size: int = 4,
                 noise: float = 0.25, seed: int = 0):
        counts = long_tail_counts(num_classes, imbalance, n_max)
        generator = torch.Generator().manual_seed(seed)
        prototypes = torch.rand(num_classes, 3, pattern_size, pattern_size, generator=generator)
        prototypes = torch.nn.functional.interpolate(prototypes, size=(image_size, image_size),
                                                     mode="bilinear", align_corners=False)
        train_labels = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(counts))
        test_labels = torch.arange(num_classes).repeat_interleave(test_per_class)
        train = self._render(prototypes, train_labels, noise, generator)
        test = self._render(prototypes, test_labels, noise, generator)
        super().__init__(train, train_labels, test, test_labels, num_classes,
                         f"synthetic-LT-{num_classes}", float(imbalance), counts)

    @staticmethod
    def _render(prototypes, labels, noise, generator):
        n = labels.numel()
        size = prototypes.shape[-1]
        images = prototypes[labels].clone()
        shifts = torch.randint(-size // 8, size // 8 + 1, (n, 2), generator=generator)
        for k in range(n):  # random translation (wrap-around), one image at a time
            images[k] = torch.roll(images[k], shifts=(int(shifts[k, 0]), int(shifts[k, 1])),
                                   dims=(1, 2))
        brightness = 0.75 + 0.5 * torch.rand(n, 1, 1, 1, generator=generator)
        images = images * brightness + noise * torch.randn(images.shape, generator=generator)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _torchvision_cifar100(root: str, train: bool):
    """torchvision's CIFAR100 reader on a local copy (never downloads)."""
    from torchvision.datasets import CIFAR100
    return CIFAR100(root, train=train, download=False)


def cifar100_available(root: Optional[str]) -> bool:
    """Whether root holds torchvision's CIFAR-100 layout (root/cifar-100-python/{train,test})."""
    if not root:
        return False
    folder = os.path.join(root, "cifar-100-python")
    return all(os.path.isfile(os.path.join(folder, f)) for f in ("train", "test", "meta"))


def load_cifar100_lt(root: str, imbalance: float = 100.0, n_max: int = 500) -> LTClassificationData:
    """CIFAR-100-LT from a local CIFAR-100 copy (see the module docstring for the rule)."""
    train_set = _torchvision_cifar100(root, True)
    test_set = _torchvision_cifar100(root, False)
    num_classes = 100
    counts = long_tail_counts(num_classes, imbalance, n_max)
    keep = long_tail_indices(train_set.targets, counts)

    def as_tensor(data):  # (N, H, W, 3) uint8 numpy -> (N, 3, H, W) uint8 tensor
        return torch.as_tensor(data).permute(0, 3, 1, 2).contiguous()

    train_images = as_tensor(train_set.data)[keep]
    train_labels = torch.as_tensor(train_set.targets, dtype=torch.int64)[keep]
    return LTClassificationData(train_images, train_labels, as_tensor(test_set.data),
                                torch.as_tensor(test_set.targets, dtype=torch.int64),
                                num_classes, "CIFAR-100-LT", float(imbalance), counts)
