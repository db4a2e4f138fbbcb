"""Long-tailed classification (gumbel_kernels.classification): data, sampler, 2-stage smoke run."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gumbel_kernels.classification import cifar_lt, train_lt
from gumbel_kernels.classification.cifar_lt import (SyntheticLTClassification, class_groups,
                                                    long_tail_counts, long_tail_indices)
from gumbel_kernels.classification.models import resnet_cifar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--synthetic", "--num-classes", "6", "--n-max", "24", "--imbalance", "8",
        "--image-size", "8", "--test-per-class", "4", "--depth", "8", "--width", "4",
        "--epochs", "1", "--stage2-epochs", "1", "--batch-size", "16", "--threads", "1"]


def test_imbalance_100_profile_matches_formula():
    counts = long_tail_counts(100, 100)
    assert counts == [int(math.floor(500 * 0.01 ** (i / 99))) for i in range(100)]
    assert counts[0] == 500 and counts[-1] == 5
    assert sum(counts) == 10847  # the usual CIFAR-100-LT (imbalance 100) training set size
    assert sum(long_tail_counts(100, 50)) == 12608
    assert sum(long_tail_counts(100, 200)) == 9502
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    groups = class_groups(counts)
    assert all(counts[c] > 100 for c in groups["many"])
    assert all(20 <= counts[c] <= 100 for c in groups["medium"])
    assert all(counts[c] < 20 for c in groups["few"])
    assert sum(len(g) for g in groups.values()) == 100


def test_first_images_in_dataset_order():
    targets = [1, 0, 1, 0, 2, 1, 0, 2, 1]
    assert long_tail_indices(targets, [2, 3, 1]).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="class 2"):
        long_tail_indices(targets, [1, 1, 3])


def test_cifar100_lt_from_a_torchvision_style_copy(monkeypatch):
    """load_cifar100_lt on a stand-in for torchvision's CIFAR100 reader (no real copy here)."""
    rng = np.random.default_rng(0)

    def fake_reader(root, train):
        per_class = 500 if train else 100
        targets = rng.permutation(np.repeat(np.arange(100), per_class)).tolist()
        data = np.zeros((len(targets), 32, 32, 3), dtype=np.uint8)
        data[:, 0, 0, 0] = np.arange(len(targets)) % 256
        return SimpleNamespace(data=data, targets=targets)

    monkeypatch.setattr(cifar_lt, "_torchvision_cifar100", fake_reader)
    data = cifar_lt.load_cifar100_lt("unused", imbalance=100)
    assert data.train_images.shape == (10847, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8
    assert data.class_counts == long_tail_counts(100, 100)
    assert torch.bincount(data.train_labels, minlength=100).tolist() == data.class_counts
    assert data.test_images.shape == (10000, 3, 32, 32)
    assert not cifar_lt.cifar100_available("/nonexistent")


def test_synthetic_fallback():
    data = SyntheticLTClassification(num_classes=5, imbalance=10, n_max=40, test_per_class=3,
                                     image_size=12, seed=1)
    assert data.class_counts == long_tail_counts(5, 10, 40)
    assert data.train_images.shape == (sum(data.class_counts), 3, 12, 12)
    assert data.train_images.dtype == torch.uint8
    assert torch.bincount(data.test_labels).tolist() == [3] * 5
    again = SyntheticLTClassification(num_classes=5, imbalance=10, n_max=40, test_per_class=3,
                                      image_size=12, seed=1)
    assert torch.equal(data.train_images, again.train_images)
    # Class-dependent: the class means differ far more than images within a class do.
    means = torch.stack([data.train_images[data.train_labels == c].float().mean(0)
                         for c in range(5)])
    assert float(torch.cdist(means.flatten(1), means.flatten(1)).max()) > 100


def test_class_balanced_sampler_is_balanced():
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor([100, 30, 10, 2]))
    generator = torch.Generator().manual_seed(0)
    drawn = train_lt.class_balanced_indices(labels, 5, 8000, generator)  # class 4 is empty
    per_class = torch.bincount(labels[drawn], minlength=5).float() / 8000
    torch.testing.assert_close(per_class[:4], torch.full((4,), 0.25), atol=0.03, rtol=0)
    assert per_class[4] == 0
    assert len(set(drawn[labels[drawn] == 3].tolist())) == 2


def test_resnet32_shape():
    model = resnet_cifar(32, 16, 100)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert model.features(torch.zeros(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(ValueError, match="6n"):
        resnet_cifar(30)


@pytest.mark.parametrize("stage2_loss", ["gumbel", "softmax"])
def test_two_stage_smoke_run(tmp_path, capsys, stage2_loss):
    out = tmp_path / "run"
    metrics = train_lt.main(TINY + ["--stage2-loss", stage2_loss, "--no-progress",
                                     "--out", str(out)])
    printed = capsys.readouterr().out
    assert "overall" in printed and "many" in printed and "medium" in printed and "few" in printed
    assert f"stage2 cRT: {stage2_loss} (balanced)" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["stage2"]["loss"] == stage2_loss
    assert saved["class_counts"] == long_tail_counts(6, 8, 24)
    for stage in ("stage1", "stage2"):
        top1 = saved[stage]["top1"]
        assert 0 <= top1["overall"] <= 100
        assert top1["many"] is None  # no class has more than 100 training images here
        assert len(saved[stage]["per_class_top1"]) == 6
    assert metrics["stage2"]["top1"] == saved["stage2"]["top1"]
    assert (out / "stage1.pt").exists() and (out / "stage2.pt").exists()


def test_stage2_freezes_the_backbone(tmp_path):
    first = tmp_path / "first"
    train_lt.main(TINY + ["--no-progress", "--out", str(first)])
    second = tmp_path / "second"
    train_lt.main(TINY + ["--no-progress", "--stage1-checkpoint", str(first / "stage1.pt"),
                          "--stage2-loss", "softmax", "--out", str(second)])
    stage1 = torch.load(first / "stage1.pt", weights_only=True)["model"]
    stage2 = torch.load(second / "stage2.pt", weights_only=True)["model"]
    for name, value in stage1.items():
        if not name.startswith("classifier."):
            assert torch.equal(value, stage2[name]), name  # weights and BN statistics
    assert not torch.equal(stage1["classifier.weight"], stage2["classifier.weight"])


def test_cli_module_with_progress_bars(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "gumbel_kernels.classification.train_lt",
                             *TINY, "--out", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "top-1" in result.stdout and "stage1: softmax (instance)" in result.stdout
    assert "stage1 epoch 1/1" in result.stderr  # tqdm
    assert (out / "metrics.json").exists()
