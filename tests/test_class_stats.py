"""gumbel::gol_loss_class_stats (EQLv2's fused pass): the CPU and CUDA kernels (the latter on a
GPU and through the emulator) against the reference, their determinism, the fake kernel and the
argument checks."""
import pytest
import torch

import gumbel_kernels as gk  # noqa: F401  (loads the op library)
from gumbel_kernels import _ops, reference

pytestmark = pytest.mark.skipif(not _ops.has_kernel("gol_loss_class_stats", "CPU"),
                                reason="the compiled CPU kernel is not built")


def op(target):
    return target.ops.gol_loss_class_stats


def make_case(n, c, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g) * 4.0).to(dtype)
    labels = torch.randint(0, c + 1, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -100
    neg_weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.1
    pos_weight = 1.0 + 4.0 * torch.rand(c, generator=g, dtype=torch.float64)
    row_weight = torch.rand(n, generator=g) + 0.5
    drop = torch.rand(c, generator=g) < 0.5
    return [t.to(device) for t in (logits, labels, drop, neg_weight, pos_weight, row_weight)]


def call(fn, logits, labels, drop, neg_weight, pos_weight, row_weight, *, mode="bce",
         activation="gumbel", reduction="mean", grad_mode="reference", seed=7):
    return fn(logits, labels, drop if mode != "bce" else None, neg_weight, pos_weight, row_weight,
              torch.tensor(seed), 0, mode, activation, reduction, -4.0, 10.0, grad_mode, -100)


@pytest.mark.parametrize("mode", ["bce", "droploss"])
@pytest.mark.parametrize("activation", ["gumbel", "sigmoid"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10),
                                         (torch.bfloat16, 1e-2)])
def test_matches_reference(target, mode, activation, reduction, dtype, rtol):
    case = make_case(300, 37, dtype, device=target.device)
    kw = dict(mode=mode, activation=activation, reduction=reduction)
    ours = call(op(target), *case, **kw)
    ref = call(reference.gol_loss_class_stats_forward, *case, **kw)
    assert ours[2].dtype == ours[3].dtype == torch.float64
    assert ours[1].dtype == dtype
    for name, a, b in zip(("loss", "grad", "pos", "neg"), ours, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=1e-6, msg=name)


def test_statistics_are_the_summed_loss_gradient_split_by_target(target):
    # Hand check on a 2 x 3 case: the sums are |w d loss / d q| of the summed loss.
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -3.0]])
    labels = torch.tensor([2, 3])  # a foreground row of class 2 and a background row
    neg_w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    pos_w = torch.tensor([3.0, 3.0, 4.0], dtype=torch.float64)
    loss, grad, pos, neg = [t.cpu() for t in call(
        op(target), *(t.to(target.device) for t in (logits, labels)), None,
        *(t.to(target.device) for t in (neg_w, pos_w)), None, reduction="mean")]
    q = logits.double()
    t = torch.exp(-q)
    d_neg = t / torch.expm1(t)  # exact-mode negative gradient; equal to BCE's away from eps
    d_pos = -t
    expected_neg = torch.tensor([0.5 * (d_neg[0, 0] + d_neg[1, 0]), 1.0 * (d_neg[0, 1] + d_neg[1, 1]),
                                 2.0 * d_neg[1, 2]], dtype=torch.float64)
    expected_pos = torch.tensor([0.0, 0.0, 4.0 * abs(d_pos[0, 2])], dtype=torch.float64)
    torch.testing.assert_close(neg, expected_neg, rtol=1e-5, atol=0)
    torch.testing.assert_close(pos, expected_pos, rtol=1e-5, atol=0)
    # The returned gradient is the mean's: the sums divided by the 2 rows, signs kept.
    assert grad[0, 2].item() == pytest.approx(4.0 * d_pos[0, 2].item() / 2, rel=1e-5)
    assert grad[1, 0].item() == pytest.approx(0.5 * d_neg[1, 0].item() / 2, rel=1e-5)


def test_deterministic_across_thread_counts(target):
    case = make_case(1000, 101, seed=3, device=target.device)  # several row blocks
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(call(op(target), *case, mode="droploss"))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_differentiable_and_opcheck(target):
    logits, labels, drop, neg_w, pos_w, row_w = make_case(12, 9, torch.float64,
                                                          device=target.device)
    x = logits.clone().requires_grad_()
    loss, grad, _, _ = call(op(target), x, labels, drop, neg_w, pos_w, row_w)
    loss.backward()
    torch.testing.assert_close(x.grad, grad)
    args = (logits, labels, None, neg_w.double(), pos_w.double(), row_w.double(), torch.tensor(1),
            0, "bce", "gumbel", "sum", -4.0, 10.0, "reference", -100)
    torch.library.opcheck(op(target), args)


def test_bad_input_names_the_argument(target):
    logits, labels, drop, neg_w, pos_w, row_w = make_case(4, 5, device=target.device)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        call(op(target), logits, labels, drop, neg_w, pos_w, row_w, reduction="none")
    with pytest.raises(ValueError, match="pos_weight must have shape"):
        call(op(target), logits, labels, drop, neg_w, pos_w[:3], row_w)


@pytest.mark.parametrize("mode", ["bce", "droploss"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10),
                                         (torch.float16, 2e-3)])
def test_lvis_width_matches_reference_and_is_deterministic(target, mode, dtype, rtol):
    # 300 rows are five row blocks of the CUDA kernel, 1203 columns several column passes.
    case = make_case(300, 1203, dtype, seed=11, device=target.device)
    ours = call(op(target), *case, mode=mode)
    again = call(op(target), *case, mode=mode)
    ref = call(reference.gol_loss_class_stats_forward, *case, mode=mode)
    for name, a, b, c in zip(("loss", "grad", "pos", "neg"), ours, again, ref):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a.double(), c.double(), rtol=rtol, atol=1e-6, msg=name)
