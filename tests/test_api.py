"""The public API: bad input (SPEC.md section 6), backend choice, helpers and loss modules."""
import warnings

import pytest
import torch

import gumbel_kernels as gk
from gumbel_kernels import backends, losses


def batch(n=6, c=5):
    logits = torch.randn(n, c)
    labels = torch.tensor([0, 1, c, c, 2, -100][:n])
    drop = torch.tensor([True, False, True, False, False][:c])
    return logits, labels, drop


BAD_INPUTS = [
    (dict(logits=torch.randn(6)), ValueError, r"logits must have shape \(N, C\)"),
    (dict(logits=torch.randn(6, 5).int()), TypeError, "logits must be float32"),
    (dict(logits=torch.randn(6, 0)), ValueError, "at least one class"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), ValueError, r"labels must have shape \(N,\) = \(6,\)"),
    (dict(labels=torch.zeros(6)), TypeError, "labels must be int64"),
    (dict(labels=torch.tensor([0, 1, 6, 5, 2, -100])), ValueError, r"labels\[2\] = 6"),
    (dict(labels=torch.tensor([0, 1, -1, 5, 2, -100])), ValueError, r"labels\[2\] = -1"),
    (dict(drop_classes=torch.ones(5)), TypeError, "drop_classes must be a bool"),
    (dict(drop_classes=torch.ones(4, dtype=torch.bool)), ValueError, r"drop_classes must have shape \(C,\) = \(5,\)"),
    (dict(class_weight=torch.ones(4)), ValueError, r"class_weight must have shape \(C,\)"),
    (dict(class_weight=torch.ones(5, dtype=torch.int64)), TypeError, "class_weight must be a floating"),
    (dict(row_weight=torch.ones(5)), ValueError, r"row_weight must have shape \(N,\)"),
    (dict(mode="focal"), ValueError, "mode must be one of"),
    (dict(activation="softmax"), ValueError, "activation must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(grad_mode="analytic"), ValueError, "grad_mode must be one of"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(clamp=(3.0, -1.0)), ValueError, "clamp must satisfy"),
    (dict(clamp=5.0), ValueError, "clamp must be None or a"),
    (dict(seed=1.5), ValueError, "seed must be"),
    (dict(offset=-1), ValueError, "offset must be"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference", "cuda_emulated"])
@pytest.mark.parametrize("override, error, message", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(backend, override, error, message):
    logits, labels, drop = batch()
    args = dict(logits=logits, labels=labels, drop_classes=drop, backend=backend)
    args.update(override)
    with pytest.raises(error, match=message):
        gk.gol_loss(**args)


def op_call(**override):
    logits, labels, drop = batch()
    args = dict(logits=logits, labels=labels, drop_classes=drop, class_weight=None,
                row_weight=None, seed=torch.tensor([1]), mode="droploss")
    args.update(override)
    return torch.ops.gumbel.gol_loss(**args)


@pytest.mark.parametrize("override, message", [
    (dict(labels=torch.tensor([0, 1, 9, 5, 2, -100])), r"labels\[2\] = 9"),
    (dict(drop_classes=torch.ones(3, dtype=torch.bool)), "drop_classes must have shape"),
    (dict(mode="nope"), "mode must be one of"),
    (dict(seed=torch.tensor([1.0])), "seed must be a one-element integer tensor on the CPU or"),
    (dict(clamp_min=2.0, clamp_max=1.0), "clamp_min < clamp_max"),
])
def test_op_called_directly_validates(override, message):
    with pytest.raises((ValueError, TypeError), match=message):
        op_call(**override)


def test_seed_forms_are_equivalent():
    logits, labels, drop = batch(6, 5)
    labels = torch.tensor([0, 0, 5, 5, 5, 5])
    a = gk.gol_loss(logits, labels, drop, seed=2 ** 64 - 1, reduction="none")
    b = gk.gol_loss(logits, labels, drop, seed=-1, reduction="none")
    c = gk.gol_loss(logits, labels, drop, seed=torch.tensor(-1), reduction="none")
    assert torch.equal(a, b) and torch.equal(a, c)


def test_drop_classes_from_frequency_is_strict():
    drop = gk.drop_classes_from_frequency([0, 10, 11, 12, 500], num_images=10_000, lambda_=0.0011)
    assert drop.tolist() == [True, True, False, False, False]  # 11 / 10000 = 0.0011 is not < 0.0011
    with pytest.raises(ValueError, match="num_images"):
        gk.drop_classes_from_frequency([1, 2], num_images=0)
    with pytest.raises(ValueError, match="image_counts must have shape"):
        gk.drop_classes_from_frequency([[1, 2]], num_images=3)


def test_backend_resolution_and_reasons(monkeypatch):
    assert backends.resolve("auto", "cpu") == "cpu"
    assert backends.resolve("reference", "cpu") == "reference"
    with pytest.raises(RuntimeError, match="'cuda' backend runs on CUDA tensors"):
        backends.resolve("cuda", "cpu")
    monkeypatch.setenv(backends.ENV_OVERRIDE, "reference")
    assert backends.resolve("auto", "cpu") == "reference"
    monkeypatch.setenv(backends.ENV_OVERRIDE, "cuda")
    with pytest.raises(RuntimeError, match="cannot run"):
        backends.resolve("auto", "cpu")


def test_auto_falls_back_once_with_a_warning(monkeypatch):
    monkeypatch.setattr(backends, "_compiled_op_reason", lambda key: "pretend it is not built")
    monkeypatch.setattr(backends, "_warned_fallback", set())
    with pytest.warns(RuntimeWarning, match="pretend it is not built"):
        assert backends.resolve("auto", "cpu") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", "cpu") == "reference"


def test_no_grad_forward_saves_nothing():
    logits, labels, drop = batch()
    x = logits.clone().requires_grad_()
    with torch.no_grad():
        loss = gk.gol_loss(x, labels, drop, seed=1)
    assert not loss.requires_grad


LVIS_LIKE_COUNTS = [1, 5, 50, 300, 2000]


@pytest.mark.parametrize("name, width, activation", [
    ("softmax", 6, "softmax"), ("sigmoid", 5, "sigmoid"), ("gumbel", 5, "gumbel"),
    ("eql", 5, "sigmoid"), ("droploss", 5, "sigmoid"), ("gol", 5, "gumbel"),
    ("gumbel_ce", 6, "gumbel")])
def test_loss_modules(name, width, activation):
    module = losses.build_classification_loss(name, LVIS_LIKE_COUNTS, 10_000)
    assert module.num_logits(5) == width and module.activation == activation
    logits = torch.randn(8, width, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 5, 5])
    loss = module(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0


def test_gol_module_is_gol_loss_with_frequency_drops():
    module = losses.GOLLoss(LVIS_LIKE_COUNTS, 10_000, lambda_=0.0011)
    assert module.drop_classes.tolist() == [True, True, False, False, False]
    logits = torch.randn(8, 5)
    labels = torch.tensor([0, 1, 2, 3, 5, 5, 5, 5])
    torch.manual_seed(0)
    a = module(logits, labels)
    torch.manual_seed(0)
    b = gk.gol_loss(logits, labels, module.drop_classes)
    assert torch.equal(a, b)


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown classification loss 'focal'"):
        losses.build_classification_loss("focal")
    with pytest.raises(ValueError, match="image_counts"):
        losses.build_classification_loss("gol")
