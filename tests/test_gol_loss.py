"""The compiled op (CPU kernel; the CUDA kernel on a GPU) against the pure-PyTorch reference."""
import itertools

import pytest
import torch

import gumbel_kernels as gk
from gumbel_kernels import reference
from conftest import TARGETS, Target, needs_emulator

MODES = ("bce", "eql", "droploss")
ACTIVATIONS = ("gumbel", "sigmoid")
REDUCTIONS = ("mean", "sum", "none")
GRAD_MODES = ("reference", "exact")


def make_batch(n, c, device, *, background=0.5, ignored=0.0, scale=4.0, seed=0,
               dtype=torch.float32):
    """Logits spanning the clamp (some exactly at and beyond it) and LVIS-like labels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * scale
    flat = logits.view(-1)
    if flat.numel() >= 8:
        flat[:8] = torch.tensor([-4.0, 10.0, -4.5, 10.5, -3.5, 9.5, 0.0, -3.3])
    labels = torch.randint(0, c, (n,), generator=g)
    draw = torch.rand(n, generator=g)
    labels[draw < background] = c
    labels[draw > 1.0 - ignored] = -100
    drop = torch.rand(c, generator=g) < 0.4
    return logits.to(device=device, dtype=dtype), labels.to(device), drop.to(device)


def run(backend, logits, labels, drop, *, upstream=None, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = gk.gol_loss(x, labels, drop, backend=backend, **kw)
    if upstream is None:
        upstream = torch.ones_like(loss)
    loss.backward(upstream)
    return loss.detach(), x.grad


def assert_matches_reference(target, logits, labels, drop, rtol=1e-5, atol=1e-6, **kw):
    ours = run(target.backend, logits, labels, drop, **kw)
    ref = run("reference", logits, labels, drop, **kw)
    for name, a, b in (("loss", ours[0], ref[0]), ("grad", ours[1], ref[1])):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("mode, activation, reduction, grad_mode",
                         list(itertools.product(MODES, ACTIVATIONS, REDUCTIONS, GRAD_MODES)))
def test_matches_reference_over_settings(target, mode, activation, reduction, grad_mode):
    logits, labels, drop = make_batch(37, 1203, target.device, ignored=0.1)
    assert_matches_reference(target, logits, labels, drop, mode=mode, activation=activation,
                             reduction=reduction, grad_mode=grad_mode, seed=1234, offset=3)


@pytest.mark.parametrize("n, c", [(1, 1203), (1, 1204), (5, 7), (64, 1204), (3, 1), (130, 33)])
@pytest.mark.parametrize("background", [0.0, 0.5, 1.0])
def test_matches_reference_over_shapes(target, n, c, background):
    logits, labels, drop = make_batch(n, c, target.device, background=background, seed=n * c)
    assert_matches_reference(target, logits, labels, drop, seed=99)


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float16, 2e-3, 1e-5),
                                               (torch.bfloat16, 1e-2, 1e-4),
                                               (torch.float64, 1e-10, 1e-12)])
def test_matches_reference_in_other_dtypes(target, dtype, rtol, atol):
    logits, labels, drop = make_batch(40, 1203, target.device, dtype=dtype, ignored=0.1)
    for reduction in REDUCTIONS:
        assert_matches_reference(target, logits, labels, drop, rtol=rtol, atol=atol,
                                 reduction=reduction, seed=5)
    loss = gk.gol_loss(logits, labels, drop, seed=5, backend=target.backend)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_weights_clamp_and_ignore_index(target):
    logits, labels, drop = make_batch(50, 1204, target.device, ignored=0.2)
    g = torch.Generator().manual_seed(3)
    class_weight = (torch.rand(1204, generator=g) + 0.5).to(target.device)
    row_weight = (torch.rand(50, generator=g) + 0.5).to(target.device)
    labels = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    for clamp in [(-4.0, 10.0), None, (-2.0, None), (None, 3.0)]:
        assert_matches_reference(target, logits, labels, drop, class_weight=class_weight,
                                 row_weight=row_weight, clamp=clamp, ignore_index=-1, seed=8,
                                 reduction="sum")


# A compiled kernel's exp is not correctly rounded: CUDA's expf is within 2 ulp, the bounded
# path's exp2-based exp (csrc/gol_math.h, ScalarOps<float>::exp_bounded) within ~3, the CPU
# kernel's Sleef-style exp within 1. So t = exp(-q) may be off by up to 4 ulp, 2^-21 relative,
# which is q off by 2^-21. Where the result is sensitive to t (BCE's eps zone, q in
# (-4, -3.32): the gradient p^2 t / eps has d log(grad) / d log(t) = 1 - 2t, about -108 at
# q = -4) that alone moves it by ~5e-5 relative, far above a flat 1e-5 (the review measured a
# 1-ulp error at 1.1x of it). The tolerance is therefore 1e-5 relative (the series and
# polynomial forms, float32 rounding) plus how far the float64 reference itself moves when q
# moves by 2^-21, plus 1e-30 absolute (results in float32's denormal range).
EXP_ULP_SHIFT = 2.0 ** -21


def assert_close_to_float64(target, logits, labels, rtol=1e-5, **kw):
    ours = run(target.backend, logits, labels, None, **kw)
    exact = run("reference", logits.double(), labels, None, **kw)
    shifted = [run("reference", logits.double() + shift, labels, None, **kw)
               for shift in (EXP_ULP_SHIFT, -EXP_ULP_SHIFT)]
    for k, name in enumerate(("loss", "grad")):
        spread = torch.maximum((shifted[0][k] - exact[k]).abs(), (shifted[1][k] - exact[k]).abs())
        tolerance = rtol * exact[k].abs() + spread + 1e-30
        error = (ours[k].double() - exact[k]).abs()
        worst = int(torch.argmax(error - tolerance))
        assert bool((error <= tolerance).all()), (
            f"{name}: at logit {logits.reshape(-1)[worst].item()!r} got "
            f"{ours[k].reshape(-1)[worst].item()!r}, float64 {exact[k].reshape(-1)[worst].item()!r}, "
            f"tolerance {tolerance.reshape(-1)[worst].item():.3g}")


@pytest.mark.parametrize("clamp", [(-4.0, 10.0), (-3.0, 27.0), (-4.5, 12.0), None],
                         ids=["default-bounded", "custom-bounded", "lean", "unclamped"])
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_elements_match_float64_on_a_dense_grid(target, clamp, grad_mode):
    # Every element formula of the float32 kernels (the bounded fast path, the series forms, the
    # switch at t = 1, BCE's eps at q ~ -3.32, both clamp edges) against the float64 reference on
    # the same logits, within what float32 and a 2-ulp exp allow (assert_close_to_float64).
    q = torch.linspace(-6.0, 30.0, 24001)
    q = torch.cat([q, torch.tensor([-4.0, 10.0, 27.0, -3.0, 12.0, -4.5, 0.0])])
    logits = torch.stack([q, q.flip(0)]).to(target.device)
    labels = torch.tensor([q.numel(), 5], device=target.device)  # a background, a foreground row
    assert_close_to_float64(target, logits, labels, mode="bce", reduction="none", clamp=clamp,
                            grad_mode=grad_mode)


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_unclamped_very_negative_logits_have_the_limit_gradient(target, grad_mode):
    # Without a clamp, t = exp(-q) overflows float32 below q = -88.7 (float64: -709.8): p t is
    # then 0 * inf. Its limit is 0 for a negative, and for a positive in BCE's dead zone; the
    # loss is the cap (positive) or 0 (negative).
    for dtype, q in ((torch.float32, [-88.0, -89.0, -200.0, -1e30]),
                     (torch.float64, [-709.0, -710.0, -1e300])):
        logits = torch.tensor([q, q], dtype=dtype, device=target.device)
        labels = torch.tensor([len(q), 0], device=target.device)  # background; positive column 0
        for backend in (target.backend, "reference"):
            loss, grad = run(backend, logits, labels, None, mode="bce", reduction="none",
                             clamp=None, grad_mode=grad_mode)
            assert bool(torch.isfinite(loss).all()), (dtype, backend, loss)
            assert bool((grad[0] == 0).all()), (dtype, backend, grad)
            assert bool((grad[1, 1:] == 0).all()), (dtype, backend, grad)
            assert loss[1, 0].item() == 100.0, (dtype, backend, loss)
            if grad_mode == "reference":
                assert grad[1, 0].item() == 0.0, (dtype, backend, grad)
            else:
                assert grad[1, 0].item() < -1e37, (dtype, backend, grad)


def test_float64_negatives_keep_their_tiny_loss(target):
    # t > 36: 1 - p rounds to 1 in float64 and -log(1 - p) to 0, though the loss is ~p.
    q = torch.tensor([[-3.6, -3.7, -3.9]], dtype=torch.float64, device=target.device)
    labels = torch.tensor([3], device=target.device)
    loss, _ = run(target.backend, q, labels, None, mode="bce", reduction="none")
    p = torch.exp(-torch.exp(-q))
    torch.testing.assert_close(loss, p, rtol=1e-12, atol=0)


def test_zero_weight_and_dropped_elements_still_surface_nan(target):
    # The CPU kernel computes only the kept elements (nonzero weight, not dropped); a NaN logit
    # on an element it skips must still poison the loss and its own gradient.
    logits, labels, _ = make_batch(6, 40, target.device, background=0.0)
    labels[:] = 1
    drop = torch.zeros(40, dtype=torch.bool, device=target.device)
    drop[7] = True  # a foreground row never trains a drop-class negative
    class_weight = torch.ones(40, device=target.device)
    class_weight[9] = 0.0
    for column in (7, 9):
        x = logits.clone()
        x[2, column] = float("nan")
        for backend in (target.backend, "reference"):
            loss, grad = run(backend, x, labels, drop, class_weight=class_weight, seed=3)
            assert torch.isnan(loss), (column, backend)
            assert torch.isnan(grad[2, column]), (column, backend)
            finite = torch.ones_like(grad, dtype=torch.bool)
            finite[2, column] = False
            assert bool(torch.isfinite(grad[finite]).all()), (column, backend)
            assert bool((grad[:, column][finite[:, column]] == 0).all()), (column, backend)


def test_nan_row_weight_surfaces_in_the_whole_row(target):
    logits, labels, drop = make_batch(6, 40, target.device, background=0.5)
    row_weight = torch.ones(6, device=target.device)
    row_weight[4] = float("nan")
    for backend in (target.backend, "reference"):
        loss, grad = run(backend, logits, labels, drop, row_weight=row_weight, seed=2)
        assert torch.isnan(loss), backend
        assert not bool(torch.isfinite(grad[4]).any()), backend
        assert bool(torch.isfinite(grad[[0, 1, 2, 3, 5]]).all()), backend


def test_reused_output_buffers_are_fully_rewritten(target):
    # The CPU op hands a freed N x C output buffer out again (csrc/cpu/huge_pages.h): every
    # element of a reused buffer must be written, ignored rows and skipped elements included.
    logits, labels, drop = make_batch(1100, 1203, target.device, ignored=0.2)
    labels = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    kw = dict(ignore_index=-1, seed=5)
    first = run(target.backend, logits, labels, drop, **kw)[1].clone()
    for _ in range(2):  # the second call's grad reuses the first call's freed buffer
        garbage = run(target.backend, logits * 3 + 1, labels, drop, **kw)[1]
        del garbage
        again = run(target.backend, logits, labels, drop, **kw)[1]
        assert torch.equal(again, first)
        del again
    none_kw = dict(kw, reduction="none")
    expected = gk.gol_loss(logits, labels, drop, backend="reference", **none_kw)
    for _ in range(2):
        torch.testing.assert_close(
            gk.gol_loss(logits, labels, drop, backend=target.backend, **none_kw),
            expected, rtol=1e-5, atol=1e-6)


def test_identical_dropped_elements(target):
    # All classes are drop classes and all rows but one foreground row are background, so the
    # loss of a background element is exactly zero iff it was dropped (for q > -2: below,
    # -log(1 - p) underflows to 0 in float32).
    n, c = 200, 1203
    logits, labels, _ = make_batch(n, c, target.device, background=1.0)
    logits = logits.clamp(-2.0, 8.0)
    labels[0] = 5
    labels[1] = 6
    drop = torch.ones(c, dtype=torch.bool, device=target.device)
    drop[6] = False  # ratio = 1/2
    kw = dict(reduction="none", seed=0xDEADBEEFCAFE, offset=11)
    ours = gk.gol_loss(logits, labels, drop, backend=target.backend, **kw)
    ref = gk.gol_loss(logits, labels, drop, backend="reference", **kw)
    dropped_ours = (ours[2:] == 0) & drop[None, :]
    dropped_ref = (ref[2:] == 0) & drop[None, :]
    assert torch.equal(dropped_ours, dropped_ref)
    u = reference.philox_uniform(n, c, 0xDEADBEEFCAFE, 11, target.device)[2:]
    assert torch.equal(dropped_ref, (u > 0.5) & drop[None, :])


def test_drop_statistics(target):
    # A background element of a drop class is kept with probability ratio = P(u <= ratio).
    n, c = 2000, 100
    labels = torch.full((n,), c, dtype=torch.int64)
    labels[:400] = torch.arange(400) % c  # foreground rows over all classes
    drop = torch.zeros(c, dtype=torch.bool)
    drop[:30] = True
    ratio = float(drop[labels[:400]].sum()) / 400
    logits = torch.zeros(n, c, device=target.device)
    loss = gk.gol_loss(logits, labels.to(target.device), drop.to(target.device), reduction="none",
                       seed=77, backend=target.backend)
    kept = (loss[400:, :30] != 0).float().mean().item()
    assert abs(kept - ratio) < 4 * (ratio * (1 - ratio) / (1600 * 30)) ** 0.5
    assert bool((loss[400:, 30:] != 0).all())  # other classes are never dropped


def test_no_foreground_drops_nothing(target):
    logits, labels, drop = make_batch(30, 50, target.device, background=1.0)
    dropped = gk.gol_loss(logits, labels, drop, seed=1, backend=target.backend)
    kept = gk.gol_loss(logits, labels, drop, mode="bce", seed=1, backend=target.backend)
    torch.testing.assert_close(dropped, kept)


def test_reference_mode_dead_zone(target):
    # A positive at q in (-4, -3.32) gets ~0 from BCE's backward but -exp(-q) from eq. 9.
    logits = torch.tensor([[-3.8, 0.0], [-3.0, 0.0]], device=target.device)
    labels = torch.tensor([0, 0], device=target.device)
    _, ref_grad = run(target.backend, logits, labels, None, reduction="sum", mode="bce")
    _, exact_grad = run(target.backend, logits, labels, None, reduction="sum",
                        mode="bce", grad_mode="exact")
    assert abs(ref_grad[0, 0].item()) < 1e-6 * abs(exact_grad[0, 0].item())
    assert exact_grad[0, 0].item() == pytest.approx(-torch.exp(torch.tensor(3.8)).item(), rel=1e-5)
    assert ref_grad[1, 0].item() == pytest.approx(exact_grad[1, 0].item(), rel=1e-2)


def test_gradcheck_float64(target):
    g = torch.Generator().manual_seed(0)
    logits = (torch.rand(6, 9, generator=g, dtype=torch.float64) * 10 - 3.5).to(target.device)
    labels = torch.tensor([0, 3, 9, 9, 8, 2], device=target.device)
    drop = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.bool, device=target.device)
    row_weight = torch.rand(6, generator=g, dtype=torch.float64).to(target.device)
    for kw in (dict(grad_mode="exact"), dict(grad_mode="reference", mode="eql"),
               dict(activation="sigmoid", reduction="none"), dict(reduction="sum")):
        if target.cuda_like:
            # gradcheck backpropagates through one graph many times: gk.gol_loss's CUDA backward
            # scales the saved gradient in place (once), the op's own autograd out of place.
            args = op_args(None, labels, drop, seed=torch.tensor([4]), row_weight=row_weight, **kw)
            fn = lambda x: target.ops.gol_loss(x, *args[1:])[0]
        else:
            fn = lambda x: gk.gol_loss(x, labels, drop, seed=4, row_weight=row_weight,
                                       backend=target.backend, **kw)
        assert torch.autograd.gradcheck(fn, (logits.clone().requires_grad_(),))


def op_args(logits, labels, drop, **kw):
    args = dict(class_weight=None, row_weight=None, seed=torch.tensor([7]), offset=0,
                mode="droploss", activation="gumbel", reduction="mean", clamp_min=-4.0,
                clamp_max=10.0, grad_mode="reference", ignore_index=-100, need_grad=True)
    args.update(kw)
    return (logits, labels, drop, args["class_weight"], args["row_weight"], args["seed"],
            args["offset"], args["mode"], args["activation"], args["reduction"],
            args["clamp_min"], args["clamp_max"], args["grad_mode"], args["ignore_index"],
            args["need_grad"])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(target, reduction):
    logits, labels, drop = make_batch(12, 33, target.device, dtype=torch.float64)
    args = op_args(logits.requires_grad_(), labels, drop, reduction=reduction)
    torch.library.opcheck(target.ops.gol_loss.default, args)
    torch.library.opcheck(target.ops.gumbel_activation.default, (logits.detach(),))


def test_op_called_directly_is_differentiable(target):
    logits, labels, drop = make_batch(10, 20, target.device)
    x = logits.clone().requires_grad_()
    loss, saved = target.ops.gol_loss(*op_args(x, labels, drop))
    (2.5 * loss).backward()
    torch.testing.assert_close(x.grad, 2.5 * saved)


def test_torch_compile_fullgraph(target):
    logits, labels, drop = make_batch(24, 1203, target.device)

    def step(x):
        return gk.gol_loss(x, labels, drop, seed=3, backend=target.backend) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = logits.clone().requires_grad_()
    compiled(x1).backward()
    x2 = logits.clone().requires_grad_()
    step(x2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_non_unit_upstream_gradient(target):
    logits, labels, drop = make_batch(20, 40, target.device)
    _, unit = run(target.backend, logits, labels, drop, seed=2)
    _, scaled = run(target.backend, logits, labels, drop, seed=2,
                    upstream=torch.tensor(-3.5, device=target.device))
    torch.testing.assert_close(scaled, -3.5 * unit)
    upstream = torch.randn(20, 40, device=target.device)
    for backend in (target.backend, "reference"):
        _, elementwise = run(backend, logits, labels, drop, seed=2, reduction="none",
                             upstream=upstream)
        _, ones = run(backend, logits, labels, drop, seed=2, reduction="none")
        torch.testing.assert_close(elementwise, upstream * ones)


def test_retained_graph_backward(target):
    # CPU: the saved gradient is never mutated, so a retained graph backpropagates twice.
    # CUDA: a non-unit upstream gradient is applied in place (no host sync), so a second
    # backward must refuse rather than return a twice-scaled gradient.
    logits, labels, drop = make_batch(4, 5, target.device)
    x = logits.clone().requires_grad_()
    loss = gk.gol_loss(x, labels, drop, seed=1, backend=target.backend)
    (3.0 * loss).backward(retain_graph=True)
    first = x.grad.clone()
    if not target.cuda_like:
        (3.0 * loss).backward()
        torch.testing.assert_close(x.grad, 2 * first)
    else:
        with pytest.raises(RuntimeError, match="backward ran twice"):
            (3.0 * loss).backward()


def test_deterministic_across_runs_and_threads(target):
    logits, labels, drop = make_batch(515, 1203, target.device)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (1, 2, 1, 2):
            torch.set_num_threads(num_threads)
            results.append(run(target.backend, logits, labels, drop, seed=11))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_seed_none_follows_manual_seed(target):
    logits, labels, drop = make_batch(50, 60, target.device)
    losses = []
    for _ in range(2):
        torch.manual_seed(123)
        losses.append(gk.gol_loss(logits, labels, drop, backend=target.backend))
    assert torch.equal(losses[0], losses[1])


def test_nan_and_inf_logits_give_non_finite_loss(target):
    logits, labels, drop = make_batch(8, 30, target.device)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = logits.clone()
        x[3, 4] = bad
        for backend in (target.backend, "reference"):
            loss, grad = run(backend, x, labels, drop, seed=1)
            assert not torch.isfinite(loss), (bad, backend)
            assert not bool(torch.isfinite(grad[3, 4])), (bad, backend)


def test_empty_batch(target):
    logits = torch.zeros(0, 1203, device=target.device, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.int64, device=target.device)
    loss = gk.gol_loss(logits, labels, backend=target.backend)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.shape == (0, 1203)
    none = gk.gol_loss(logits, labels, reduction="none", backend=target.backend)
    assert none.shape == (0, 1203)


def test_non_contiguous_inputs(target):
    logits, labels, drop = make_batch(30, 41, target.device)
    wide = torch.zeros(41, 60, device=target.device)
    wide[:, :30] = logits.t()
    strided = wide[:, :30].t()
    assert not strided.is_contiguous()
    labels2 = torch.stack([labels, labels], 1)[:, 0]
    a = run(target.backend, strided, labels2, drop, seed=4)
    b = run(target.backend, logits, labels, drop, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_int32_labels(target):
    logits, labels, drop = make_batch(30, 41, target.device)
    a = gk.gol_loss(logits, labels.int(), drop, seed=4, backend=target.backend)
    b = gk.gol_loss(logits, labels, drop, seed=4, backend=target.backend)
    assert torch.equal(a, b)


def test_gumbel_activation(target):
    q = torch.tensor([-50.0, -3.0, 0.0, 2.0, 50.0], device=target.device)
    scores = gk.gumbel_activation(q)
    torch.testing.assert_close(scores, torch.exp(-torch.exp(-q)))
    x = q.clone().requires_grad_()
    gk.gumbel_activation(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.exp(-torch.exp(-q)) * torch.exp(-q))
    half = gk.gumbel_activation(q.half())
    assert half.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# The CUDA backend's own semantics, on the GPU and through the emulator.
CUDA_TARGETS = [p for p in TARGETS if p.values[0].cuda_like]


@pytest.fixture(params=CUDA_TARGETS)
def cuda_target(request) -> Target:
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_unaligned_storage_gives_the_same_results(cuda_target, dtype):
    # A storage offset of one element breaks the 16-byte (8-byte for 16-bit types) alignment of
    # the vector loads: the host logic copies such logits to aligned storage; the results agree.
    logits, labels, drop = make_batch(9, 37, cuda_target.device, dtype=dtype)
    storage = torch.empty(logits.numel() + 1, dtype=dtype, device=cuda_target.device)
    shifted = storage[1:].view(9, 37)
    shifted.copy_(logits)
    assert shifted.is_contiguous() and shifted.storage_offset() == 1
    for reduction in REDUCTIONS:
        a = run(cuda_target.backend, shifted, labels, drop, seed=6, reduction=reduction)
        b = run(cuda_target.backend, logits, labels, drop, seed=6, reduction=reduction)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), reduction


def test_bad_label_is_reported_not_read(cuda_target):
    logits = torch.randn(4, 6, device=cuda_target.device)
    labels = torch.tensor([0, 6, 1000000, 2], device=cuda_target.device)
    seed = torch.tensor([1])
    with pytest.raises(ValueError, match=r"labels\[2\] = 1000000"):
        cuda_target.ops.gol_loss(logits, labels, None, None, None, seed)
    with pytest.raises(ValueError, match=r"labels\[1\] = -3"):
        cuda_target.ops.gol_loss_class_stats(logits, torch.tensor([0, -3, 9, 2]), None, None,
                                             None, None, seed)


def test_unchecked_bad_labels_give_nan_rows(cuda_target, monkeypatch):
    # GUMBEL_CUDA_CHECK_LABELS=0 (no host sync): a bad row is NaN, every other row is exact.
    monkeypatch.setenv("GUMBEL_CUDA_CHECK_LABELS", "0")
    logits, labels, drop = make_batch(6, 9, cuda_target.device)
    bad = labels.clone()
    bad[2] = 10 ** 6
    bad[4] = -7
    seed = torch.tensor([3])
    loss, grad = cuda_target.ops.gol_loss(logits, bad, drop, None, None, seed, reduction="none")
    expected_loss, expected_grad = cuda_target.ops.gol_loss(logits, labels, drop, None, None,
                                                            seed, reduction="none")
    good = torch.tensor([0, 1, 3, 5])
    assert bool(torch.isnan(loss[[2, 4]]).all()) and bool(torch.isnan(grad[[2, 4]]).all())
    assert torch.equal(loss[good], expected_loss[good]) and torch.equal(grad[good], expected_grad[good])
    mean, _ = cuda_target.ops.gol_loss(logits, bad, drop, None, None, seed)
    assert torch.isnan(mean)


@needs_emulator
def test_no_host_label_check_under_capture(monkeypatch):
    # While a CUDA graph is captured no host sync may run: the label check is skipped and a bad
    # row turns NaN instead of raising (the emulator stands in for the capture).
    ops = torch.ops.gumbel_emulated
    logits = torch.randn(3, 5)
    labels = torch.tensor([1, 99, 5])
    previous = ops.emulate_capture(True)
    try:
        loss, grad = ops.gol_loss(logits, labels, None, None, None, torch.tensor([0]))
    finally:
        ops.emulate_capture(previous)
    assert torch.isnan(loss) and bool(torch.isnan(grad[1]).all())
    assert bool(torch.isfinite(grad[[0, 2]]).all())
    with pytest.raises(ValueError, match=r"labels\[1\] = 99"):
        ops.gol_loss(logits, labels, None, None, None, torch.tensor([0]))


def test_scale_grad_op(cuda_target):
    # The backward kernel: a scalar upstream gradient of 1 is recognised on the device and
    # leaves the gradient untouched; others scale it in place; an (N, C) one multiplies.
    grad = torch.randn(7, 33, device=cuda_target.device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        g = grad.to(dtype)
        before = g.clone()
        cuda_target.ops.scale_grad_(g, torch.tensor(1.0, device=cuda_target.device))
        assert torch.equal(g, before)
        cuda_target.ops.scale_grad_(g, torch.tensor(-2.5, device=cuda_target.device))
        torch.testing.assert_close(g, (before.double() * -2.5).to(dtype))
        upstream = torch.rand(7, 33, device=cuda_target.device, dtype=dtype)
        cuda_target.ops.scale_grad_(g, upstream)
        torch.testing.assert_close(g, (before.double() * -2.5).to(dtype) * upstream)


def test_seed_on_the_device_matches_the_cpu_seed(cuda_target):
    # A seed tensor on the logits' device is read by the kernel itself (no host sync, and under
    # CUDA-graph capture a seed drawn on the device changes every replay); same drops.
    logits, labels, drop = make_batch(40, 50, cuda_target.device, background=0.7)
    cpu_seed = torch.tensor([0x1234_5678_9ABC])
    on_device = cpu_seed.to(cuda_target.device)
    a = cuda_target.ops.gol_loss(logits, labels, drop, None, None, cpu_seed, 5, reduction="none")
    b = cuda_target.ops.gol_loss(logits, labels, drop, None, None, on_device, 5, reduction="none")
    ref = gk.gol_loss(logits, labels, drop, seed=0x1234_5678_9ABC, offset=5, reduction="none",
                      backend="reference")
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[0] == 0, ref == 0)


def test_flat_index_beyond_int32(cuda_target):
    # N * C > 2^31: the last rows are only right if every flat index is 64-bit. float16 logits
    # and gradient (2 x 4.3 GB) fit this 24 GiB machine; the ignored rows cost the emulator only
    # the index walk, the last three rows are computed.
    c = 1204
    n = 2 ** 31 // c + 3
    logits = torch.zeros(n, c, dtype=torch.float16, device=cuda_target.device)
    tail = (torch.randn(3, c, generator=torch.Generator().manual_seed(0)) * 3).half()
    logits[-3:] = tail.to(cuda_target.device)
    labels = torch.full((n,), -100, dtype=torch.int64, device=cuda_target.device)
    labels[-3:] = torch.tensor([c, 17, c])
    x = logits.requires_grad_()
    loss = gk.gol_loss(x, labels, None, mode="bce", reduction="sum", backend=cuda_target.backend)
    loss.backward()
    expected_loss, expected_grad = run("reference", tail.float(), labels[-3:].cpu(), None,
                                       mode="bce", reduction="sum")
    torch.testing.assert_close(loss.cpu(), expected_loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(x.grad[-3:].float().cpu(), expected_grad, rtol=2e-3, atol=1e-4)
    assert not bool(x.grad[: -3 : 100_000].any())
