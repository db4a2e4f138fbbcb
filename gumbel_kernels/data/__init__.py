"""Data for the detection harness: the LVIS json dataset, transforms, repeat-factor sampling and
a synthetic LVIS-format generator (tests and the CPU demo)."""
from .lvis import LVISDataset, collate_fn, frequency_from_image_count
from .sampler import (RepeatFactorSampler, aspect_ratio_groups, build_train_sampler,
                      make_batches, repeat_factors)
from .transforms import ResizeConfig, build_transforms

__all__ = [
    "LVISDataset", "collate_fn", "frequency_from_image_count",
    "RepeatFactorSampler", "aspect_ratio_groups", "build_train_sampler", "make_batches",
    "repeat_factors",
    "ResizeConfig", "build_transforms",
]
