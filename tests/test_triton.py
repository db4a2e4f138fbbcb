"""The Triton backend against the reference: under TRITON_INTERPRET=1 on CPU tensors (the second
pytest run of `make test`), compiled on a GPU. Skipped otherwise."""
import itertools
import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1 set before import (make test runs it)",
                allow_module_level=True)

import gumbel_kernels as gk  # noqa: E402
from gumbel_kernels.triton import gol_loss as triton_gol  # noqa: E402

DEVICE = "cpu" if INTERPRETED else "cuda"


def batch(n=13, c=33, *, seed=0, background=0.4, ignored=0.1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 4
    flat = logits.view(-1)
    flat[:6] = torch.tensor([-4.0, 10.0, -4.5, 10.5, -3.5, 0.0])[: flat.numel()]
    labels = torch.randint(0, c, (n,), generator=g)
    draw = torch.rand(n, generator=g)
    labels[draw < background] = c
    labels[draw > 1 - ignored] = -100
    drop = torch.rand(c, generator=g) < 0.4
    return logits.to(DEVICE, dtype), labels.to(DEVICE), drop.to(DEVICE)


def run(backend, logits, labels, drop, **kw):
    x = logits.clone().requires_grad_()
    loss = gk.gol_loss(x, labels, drop, backend=backend, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad


def check(logits, labels, drop, rtol=1e-5, atol=1e-6, **kw):
    ours = run("triton", logits, labels, drop, **kw)
    ref = run("reference", logits, labels, drop, **kw)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode, activation, reduction, grad_mode", list(itertools.product(
    ("bce", "eql", "droploss"), ("gumbel", "sigmoid"), ("mean", "sum", "none"),
    ("reference", "exact"))))
def test_matches_reference(mode, activation, reduction, grad_mode):
    logits, labels, drop = batch()
    check(logits, labels, drop, mode=mode, activation=activation, reduction=reduction,
          grad_mode=grad_mode, seed=2 ** 40 + 3, offset=2 ** 33 + 1)


@pytest.mark.parametrize("n, c, background", [(1, 7, 0.0), (9, 7, 1.0), (17, 13, 0.0), (5, 1, 0.5)])
def test_shapes(n, c, background):
    logits, labels, drop = batch(n, c, seed=n + c, background=background, ignored=0.0)
    check(logits, labels, drop, seed=3)


def test_weights_and_clamps():
    logits, labels, drop = batch()
    g = torch.Generator().manual_seed(1)
    class_weight = (torch.rand(33, generator=g) + 0.5).to(DEVICE)
    row_weight = (torch.rand(13, generator=g) + 0.5).to(DEVICE)
    for clamp in [None, (-2.0, None), (None, 3.0), (-3.0, 6.0)]:
        check(logits, labels, drop, clamp=clamp, class_weight=class_weight, row_weight=row_weight,
              seed=9, reduction="sum")


def test_half_and_double_inputs():
    logits, labels, drop = batch(dtype=torch.float16)
    check(logits, labels, drop, rtol=2e-3, atol=1e-4, seed=4)
    logits, labels, drop = batch(dtype=torch.float64)
    check(logits, labels, drop, rtol=1e-9, atol=1e-12, seed=4)


def test_identical_dropped_elements():
    n, c = 20, 33
    logits, labels, _ = batch(n, c, background=1.0, ignored=0.0)
    logits = logits.clamp(-2.0, 8.0)  # -log(1 - p) > 0 here, so loss 0 means dropped
    labels[0], labels[1] = 4, 5
    drop = torch.ones(c, dtype=torch.bool, device=DEVICE)
    drop[5] = False
    kw = dict(reduction="none", seed=0xDEADBEEFCAFE, offset=11)
    ours = gk.gol_loss(logits, labels, drop, backend="triton", **kw)
    ref = gk.gol_loss(logits, labels, drop, backend="reference", **kw)
    assert torch.equal(ours[2:] == 0, ref[2:] == 0)
    assert bool((ref[2:] == 0).any()) and bool((ref[2:] != 0).any())


def test_no_grad_and_empty_batch():
    logits, labels, drop = batch()
    with torch.no_grad():
        loss = gk.gol_loss(logits, labels, drop, seed=1, backend="triton")
    ref = gk.gol_loss(logits, labels, drop, seed=1, backend="reference")
    torch.testing.assert_close(loss, ref)
    empty = torch.zeros(0, 7, device=DEVICE, requires_grad=True)
    loss = gk.gol_loss(empty, torch.zeros(0, dtype=torch.int64, device=DEVICE), backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 7)


def test_scale_grad():
    grad = torch.randn(5, 7, device=DEVICE)
    before = grad.clone()
    triton_gol.scale_grad_(grad, torch.tensor(1.0, device=DEVICE))
    assert torch.equal(grad, before)
    triton_gol.scale_grad_(grad, torch.tensor(2.5, device=DEVICE))
    torch.testing.assert_close(grad, 2.5 * before)
    upstream = torch.randn(5, 7, device=DEVICE)
    triton_gol.scale_grad_(grad, upstream)
    torch.testing.assert_close(grad, 2.5 * before * upstream)


@pytest.mark.parametrize("override, error", [
    (dict(labels=torch.tensor([0, 40] + [0] * 11)), r"labels\[1\] = 40"),
    (dict(mode="nope"), "mode must be one of"),
    (dict(drop_classes=torch.ones(3, dtype=torch.bool)), "drop_classes must have shape"),
])
def test_bad_inputs(override, error):
    logits, labels, drop = batch()
    args = dict(logits=logits, labels=labels, drop_classes=drop, backend="triton")
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in override.items()})
    with pytest.raises(ValueError, match=error):
        gk.gol_loss(**args)
