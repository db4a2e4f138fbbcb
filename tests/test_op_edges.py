"""Edges of the op every backend must handle the same way: non-finite weights, what cannot be
differentiated, torch.compile of the reference, the seed drawn under compilation, import cost."""
import subprocess
import sys

import pytest
import torch

import gumbel_kernels as gk
from conftest import TARGETS


def batch(n=12, c=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 3
    labels = torch.randint(0, c, (n,), generator=g)
    labels[::2] = c  # background rows, which DropLoss thins
    drop = torch.zeros(c, dtype=torch.bool)
    drop[[1, 4, 6]] = True
    return logits, labels, drop


def run(backend, logits, labels, drop, **kw):
    x = logits.clone().requires_grad_()
    loss = gk.gol_loss(x, labels, drop, seed=5, backend=backend, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), x.grad


def assert_same_values(a, b, what):
    # NaN where the reference has NaN, the same infinities, the finite values close.
    assert torch.equal(torch.isnan(a), torch.isnan(b)), what
    assert torch.equal(torch.isposinf(a), torch.isposinf(b)), what
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), what
    finite = torch.isfinite(b)
    torch.testing.assert_close(a[finite], b[finite], rtol=1e-5, atol=1e-6, msg=what)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["class_weight", "row_weight"])
def test_non_finite_weights_match_the_reference(target, bad, which):
    logits, labels, drop = batch()
    logits, labels, drop = logits.to(target.device), labels.to(target.device), drop.to(target.device)
    weight = torch.ones(logits.shape[1] if which == "class_weight" else logits.shape[0])
    weight[4] = bad  # class 4 is a drop class; row 4 is a background row
    weight = weight.to(target.device)
    for reduction in ("none", "sum", "mean"):
        kw = {which: weight, "reduction": reduction}
        ours = run(target.backend, logits, labels, drop, **kw)
        ref = run("reference", logits, labels, drop, **kw)
        assert_same_values(ours[0].cpu(), ref[0].cpu(), f"{which}={bad} {reduction} loss")
        assert_same_values(ours[1].cpu(), ref[1].cpu(), f"{which}={bad} {reduction} grad")


@pytest.mark.parametrize("which", ["class_weight", "row_weight"])
def test_weights_that_require_grad_are_refused(which):
    logits, labels, drop = batch()
    weight = torch.ones(logits.shape[1] if which == "class_weight" else logits.shape[0],
                        requires_grad=True)
    with pytest.raises(ValueError, match=f"{which} requires grad"):
        gk.gol_loss(logits, labels, drop, **{which: weight})
    with torch.no_grad():  # nothing is differentiated: allowed
        gk.gol_loss(logits, labels, drop, **{which: weight})
    gk.gol_loss(logits, labels, drop, **{which: weight.detach()})


@pytest.mark.parametrize("backend", ["cpu", "reference", "cuda_emulated"])
def test_double_backward_is_refused(backend):
    if backend == "cuda_emulated" and gk._ops.emulated_error():
        pytest.skip(gk._ops.emulated_error())
    logits, labels, drop = batch()
    x = logits.clone().requires_grad_()
    loss = gk.gol_loss(x, labels, drop, seed=1, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    # The op's own autograd refuses it too.
    loss, _ = torch.ops.gumbel.gol_loss(x, labels, drop, None, None, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_functorch_transforms_are_refused():
    logits, labels, drop = batch()
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.grad(lambda x: gk.gol_loss(x, labels, drop, seed=1))(logits)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.vmap(lambda x: gk.gol_loss(x[None], labels[:1], drop, seed=1))(logits)


def test_reference_backend_compiles_without_graph_breaks():
    logits, labels, drop = batch()

    def step(x):
        return gk.gol_loss(x, labels, drop, seed=3, backend="reference") * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = logits.clone().requires_grad_()
    loss1 = compiled(x1)
    loss1.backward()
    x2 = logits.clone().requires_grad_()
    loss2 = step(x2)
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_seed_none_draws_the_same_seed_compiled_and_eager(backend):
    # With seed=None the drop seed comes from torch's default generator through an op that
    # torch.compile does not trace into: compiled and eager code drop the same elements.
    logits, labels, drop = batch(n=40, c=30)
    drop[:] = True
    drop[0] = False

    def losses(x):
        return (gk.gol_loss(x, labels, drop, reduction="none", backend=backend),
                gk.gol_loss(x, labels, drop, reduction="none", backend=backend))

    torch._dynamo.reset()
    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    torch.manual_seed(77)
    eager = losses(logits)
    torch.manual_seed(77)
    traced = compiled(logits)
    for a, b in zip(eager, traced):
        assert torch.equal(a == 0, b == 0)
    assert not torch.equal(eager[0] == 0, eager[1] == 0)  # two calls, two seeds


def test_import_does_not_load_the_compiler_stack():
    code = ("import sys, gumbel_kernels; "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'triton') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
