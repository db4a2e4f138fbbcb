"""Repeat-factor sampling (RFS, LVIS paper sec. 5) and the plain uniform sampler for training.

Per class c with image frequency f_c = image_count_c / num_images (num_images: the training
images with annotations, as mmdetection counts its filtered dataset), the class repeat factor is
r_c = max(1, sqrt(t / f_c)) (t = 0.001 on LVIS); an image's factor is the largest r_c over the
classes it contains (1 for an image with no annotation). One epoch then holds each image
- `mode="deterministic"`: ceil(r_I) times -- GOL's rule (mmdetection's ClassBalancedDataset);
- `mode="stochastic"`: floor(r_I) + Bernoulli(frac(r_I)) times, redrawn every epoch --
  detectron2's RepeatFactorTrainingSampler rule (expected count r_I).
The factors are computed in float64 with the same operation order as mmdetection, so
`ceil` lands where GOL's does.

Distributed training: every rank builds the same epoch list (same seed and epoch), pads it by
wrapping to a multiple of the world size, and takes the positions rank, rank + R, ... -- like
torch's DistributedSampler: disjoint slices of equal length. Call `set_epoch(e)` every epoch.

Batches: `make_batches(indices, batch_size, groups)` cuts a rank's epoch list into batches; with
aspect-ratio groups (`aspect_ratio_groups`: mmdetection's flag, landscape vs. portrait) every
batch holds images of one group only, as torchvision's GroupedBatchSampler builds them, so a
padded batch of two images wastes no half-empty canvas. It is a function of the epoch list, so
it composes with RFS, DDP (every rank gets the same number of batches) and an exact resume.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["repeat_factors", "RepeatFactorSampler", "build_train_sampler",
           "aspect_ratio_groups", "make_batches"]


def repeat_factors(dataset_or_class_sets, image_counts, num_images: int,
                   threshold: float = 0.001) -> torch.Tensor:
    """Per-image repeat factors r_I, a float64 tensor of len(dataset).

    Args:
        dataset_or_class_sets: an object with `image_class_indices(i)` and `__len__` (e.g.
            LVISDataset) or a sequence of iterables of contiguous class indices, one per image.
        image_counts: (C,) number of training images of each class.
        num_images: number of training images (the denominator of f_c).
        threshold: t of the formula. LVIS uses 0.001 (with ~100k images); on a small set
            every f_c >= 1 / num_images may exceed it (the 200-image synthetic set repeats
            nothing at 0.001): scale t with the data set.
    """
    if num_images <= 0:
        raise ValueError(f"num_images={num_images} must be positive")
    if hasattr(dataset_or_class_sets, "image_class_indices"):
        ds = dataset_or_class_sets
        class_sets: Iterable = (ds.image_class_indices(i) for i in range(len(ds)))
    else:
        class_sets = dataset_or_class_sets
    counts = torch.as_tensor(image_counts).tolist()
    # A class never seen (count 0) cannot occur in an image; counting it as 1 image keeps the
    # formula finite if a file says otherwise.
    class_factor = [max(1.0, math.sqrt(threshold / (max(n, 1) / num_images))) for n in counts]
    factors = []
    for i, classes in enumerate(class_sets):
        r = 1.0
        for c in classes:
            if not 0 <= c < len(class_factor):
                raise ValueError(f"image {i}: class index {c} is outside [0, {len(class_factor)})")
            r = max(r, class_factor[c])
        factors.append(r)
    return torch.tensor(factors, dtype=torch.float64)


def _world(num_replicas: Optional[int], rank: Optional[int]):
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
    return num_replicas, rank


class RepeatFactorSampler(torch.utils.data.Sampler):
    """Epoch-based sampler repeating image i about factors[i] times per epoch.

    Args:
        factors: (N,) repeat factors >= 1 (`repeat_factors(...)`; all ones = plain sampling).
        mode: "deterministic" (ceil) or "stochastic" (floor + Bernoulli(frac)).
        shuffle: shuffle the epoch list (else images in order, repeats adjacent).
        seed: base seed; epoch e uses seed + e, identically on every rank.
        num_replicas, rank: distributed world; default: from torch.distributed, else 1 and 0.
    """

    def __init__(self, factors, mode: str = "deterministic", shuffle: bool = True,
                 seed: int = 0, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        if mode not in ("deterministic", "stochastic"):
            raise ValueError(f"mode={mode!r} must be 'deterministic' or 'stochastic'")
        self.factors = torch.as_tensor(factors, dtype=torch.float64).flatten()
        if self.factors.numel() and (self.factors < 1).any():
            raise ValueError("repeat factors must be >= 1")
        self.mode = mode
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas, self.rank = _world(num_replicas, rank)
        self.epoch = 0
        self._cache = None  # (epoch, this rank's indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def repeat_counts(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """How often each image occurs in one epoch (int64 (N,))."""
        if self.mode == "deterministic":
            return torch.ceil(self.factors).to(torch.int64)
        whole = torch.floor(self.factors)
        frac = self.factors - whole
        extra = torch.rand(frac.shape, generator=generator, dtype=torch.float64) < frac
        return whole.to(torch.int64) + extra.to(torch.int64)

    def epoch_indices(self) -> torch.Tensor:
        """The whole epoch's list (before the per-rank split), the same on every rank."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        counts = self.repeat_counts(g)
        indices = torch.repeat_interleave(torch.arange(len(counts)), counts)
        if self.shuffle:
            indices = indices[torch.randperm(len(indices), generator=g)]
        return indices

    def _rank_indices(self) -> list:
        if self._cache is None or self._cache[0] != self.epoch:
            indices = self.epoch_indices()
            per_rank = math.ceil(len(indices) / self.num_replicas) if len(indices) else 0
            total = per_rank * self.num_replicas
            if total > len(indices):  # pad by wrapping around (repeatedly if very short)
                reps = math.ceil(total / len(indices))
                indices = indices.repeat(reps)[:total]
            self._cache = (self.epoch, indices[self.rank:total:self.num_replicas].tolist())
        return self._cache[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices())

    def __len__(self) -> int:
        return len(self._rank_indices())


def build_train_sampler(dataset, kind: str = "rfs", *, threshold: float = 0.001,
                        mode: str = "deterministic", shuffle: bool = True, seed: int = 0,
                        num_replicas: Optional[int] = None,
                        rank: Optional[int] = None) -> RepeatFactorSampler:
    """Training sampler by config name.

    kind="rfs": repeat-factor sampling with `dataset.image_counts` /
    `dataset.num_images_with_annotations`;
    kind="random": every image once per epoch, shuffled (same distributed behaviour).
    """
    if kind == "rfs":
        factors = repeat_factors(dataset, dataset.image_counts,
                                 dataset.num_images_with_annotations, threshold)
    elif kind in ("random", "uniform"):
        factors = torch.ones(len(dataset), dtype=torch.float64)
    else:
        raise ValueError(f"kind={kind!r} must be 'rfs' or 'random'")
    return RepeatFactorSampler(factors, mode=mode, shuffle=shuffle, seed=seed,
                               num_replicas=num_replicas, rank=rank)


def aspect_ratio_groups(dataset) -> List[int]:
    """Per item: 1 if the image is wider than tall, else 0 (mmdetection's group flag), from the
    json's width and height (no image is read)."""
    infos = (dataset.image_info(i) for i in range(len(dataset)))
    return [int(info["width"] > info["height"]) for info in infos]


def make_batches(indices: Sequence[int], batch_size: int,
            groups: Optional[Sequence[int]] = None) -> List[List[int]]:
    """ceil(len(indices) / batch_size) batches of `indices`, in order.

    Without `groups`: consecutive slices (the last one may be short). With `groups` (a group id
    per dataset item): torchvision's GroupedBatchSampler rule -- each index joins its group's
    buffer and a full buffer is a batch; at the end, the fullest leftover buffers are topped
    up with that group's earliest indices of the epoch (cycling if the group is smaller than a
    batch) until the count is reached; the images of leftover buffers not needed are left out
    of this epoch (fewer than batch_size per group)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    count = math.ceil(len(indices) / batch_size)
    if groups is None:
        return [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    out: List[List[int]] = []
    buffers: dict = {}
    seen: dict = {}
    for index in indices:
        group = groups[index]
        buffers.setdefault(group, []).append(index)
        seen.setdefault(group, []).append(index)
        if len(buffers[group]) == batch_size:
            out.append(buffers.pop(group))
    leftovers = sorted(buffers.items(), key=lambda item: -len(item[1]))  # stable: first seen
    for group, partial in leftovers[:count - len(out)]:
        members = seen[group]
        need = batch_size - len(partial)
        partial += [members[k % len(members)] for k in range(need)]
        out.append(partial)
    return out
