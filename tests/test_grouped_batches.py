"""Aspect-ratio grouped batches: one orientation per batch, ceil(n / batch) batches, composed
with repeat-factor sampling and a DDP split (equal batch counts on every rank), and an exact
resume of a grouped run."""
import json
import os

import pytest
import torch

from gumbel_kernels import train as train_cli
from gumbel_kernels.data import RepeatFactorSampler, aspect_ratio_groups, make_batches
from gumbel_kernels.engine import trainer as trainer_module

from test_train import tiny_config  # noqa: F401 (a fixture)


def test_plain_batches_are_slices():
    assert make_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="batch_size"):
        make_batches([1], 0)


def test_grouped_batches_hold_one_group_each():
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]  # per dataset item
    order = [3, 1, 0, 2, 9, 5, 4, 8, 6, 10, 7]
    out = make_batches(order, 2, groups)
    assert len(out) == 6  # ceil(11 / 2), as without grouping
    assert all(len(b) == 2 and len({groups[i] for i in b}) == 1 for b in out)
    # full buffers in the order they fill; the leftover 10 topped up with its group's first
    assert out == [[3, 0], [1, 2], [9, 4], [5, 6], [8, 7], [10, 3]]
    assert make_batches(order, 2, groups) == out  # a function of the epoch list (resume)


def test_a_group_smaller_than_a_batch_is_cycled():
    out = make_batches([0, 1, 2, 3, 4], 4, [0, 0, 0, 0, 1])
    assert out == [[0, 1, 2, 3], [4, 4, 4, 4]]


def test_composes_with_rfs_and_ddp():
    factors = torch.tensor([1.0, 3.5, 1.0, 2.0, 1.0, 1.0, 4.0, 1.0, 1.0, 1.7] * 3)
    groups = [k % 3 == 0 for k in range(len(factors))]
    counts = []
    for rank in range(2):
        sampler = RepeatFactorSampler(factors, seed=3, num_replicas=2, rank=rank)
        sampler.set_epoch(1)
        indices = list(sampler)
        out = make_batches(indices, 2, groups)
        counts.append(len(out))
        assert all(len({groups[i] for i in b}) == 1 for b in out)
        assert len(out) == -(-len(indices) // 2)
    assert counts[0] == counts[1]  # DDP: every rank takes the same number of steps


class _Info:
    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def image_info(self, i):
        return {"height": self.sizes[i][0], "width": self.sizes[i][1]}


def test_groups_are_mmdetections_landscape_flag():
    assert aspect_ratio_groups(_Info([(480, 640), (640, 480), (500, 500), (427, 640)])) == \
        [1, 0, 0, 1]


def test_grouped_training_resumes_exactly(tiny_config, tmp_path, monkeypatch):  # noqa: F811
    # The generated images are square (one group): give them alternating orientations.
    monkeypatch.setattr(trainer_module, "aspect_ratio_groups",
                        lambda dataset: [i % 2 for i in range(len(dataset))])
    common = ["--config", str(tiny_config), "--no-progress", "--no-eval",
              "--set", "data.aspect_ratio_grouping=true"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train_cli.main(common + ["--out", str(straight), "--max-iters", "3"])
    train_cli.main(common + ["--out", str(interrupted), "--max-iters", "2"])  # mid-epoch
    train_cli.main(common + ["--out", str(interrupted), "--max-iters", "3", "--resume"])

    def losses(folder):
        with open(os.path.join(folder, "log.jsonl")) as f:
            return [json.loads(line)["loss"] for line in f]

    a, b = losses(straight), losses(interrupted)
    assert len(a) == len(b) == 3
    assert b[2:] == pytest.approx(a[2:], rel=1e-6, abs=1e-7)
