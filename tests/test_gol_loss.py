"""The compiled op (CPU kernel; the CUDA kernel on a GPU) against the pure-PyTorch reference."""
import itertools

import pytest
import torch

import gumbel_kernels as gk
from gumbel_kernels import reference
from conftest import compiled_backend

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


def assert_matches_reference(device, logits, labels, drop, rtol=1e-5, atol=1e-6, **kw):
    ours = run(compiled_backend(device), logits, labels, drop, **kw)
    ref = run("reference", logits, labels, drop, **kw)
    for name, a, b in (("loss", ours[0], ref[0]), ("grad", ours[1], ref[1])):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("mode, activation, reduction, grad_mode",
                         list(itertools.product(MODES, ACTIVATIONS, REDUCTIONS, GRAD_MODES)))
def test_matches_reference_over_settings(device, mode, activation, reduction, grad_mode):
    logits, labels, drop = make_batch(37, 1203, device, ignored=0.1)
    assert_matches_reference(device, logits, labels, drop, mode=mode, activation=activation,
                             reduction=reduction, grad_mode=grad_mode, seed=1234, offset=3)


@pytest.mark.parametrize("n, c", [(1, 1203), (1, 1204), (5, 7), (64, 1204), (3, 1), (130, 33)])
@pytest.mark.parametrize("background", [0.0, 0.5, 1.0])
def test_matches_reference_over_shapes(device, n, c, background):
    logits, labels, drop = make_batch(n, c, device, background=background, seed=n * c)
    assert_matches_reference(device, logits, labels, drop, seed=99)


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float16, 2e-3, 1e-5),
                                               (torch.bfloat16, 1e-2, 1e-4),
                                               (torch.float64, 1e-10, 1e-12)])
def test_matches_reference_in_other_dtypes(device, dtype, rtol, atol):
    logits, labels, drop = make_batch(40, 1203, device, dtype=dtype, ignored=0.1)
    for reduction in REDUCTIONS:
        assert_matches_reference(device, logits, labels, drop, rtol=rtol, atol=atol,
                                 reduction=reduction, seed=5)
    loss = gk.gol_loss(logits, labels, drop, seed=5, backend=compiled_backend(device))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_weights_clamp_and_ignore_index(device):
    logits, labels, drop = make_batch(50, 1204, device, ignored=0.2)
    g = torch.Generator().manual_seed(3)
    class_weight = (torch.rand(1204, generator=g) + 0.5).to(device)
    row_weight = (torch.rand(50, generator=g) + 0.5).to(device)
    labels = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    for clamp in [(-4.0, 10.0), None, (-2.0, None), (None, 3.0)]:
        assert_matches_reference(device, logits, labels, drop, class_weight=class_weight,
                                 row_weight=row_weight, clamp=clamp, ignore_index=-1, seed=8,
                                 reduction="sum")


@pytest.mark.parametrize("clamp", [(-4.0, 10.0), (-3.0, 27.0), (-4.5, 12.0), None],
                         ids=["default-bounded", "custom-bounded", "lean", "unclamped"])
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_elements_match_float64_on_a_dense_grid(device, clamp, grad_mode):
    # Every element formula of the float32 kernels (the bounded fast path, the series forms, the
    # switch at t = 1, BCE's eps at q ~ -3.32, both clamp edges) against the float64 reference on
    # the same logits. Near q = -4 the float32 rounding of t = exp(-q) alone moves the loss by
    # up to t * 6e-8 ~ 3.3e-6 relative, hence rtol 1e-5.
    q = torch.linspace(-6.0, 30.0, 24001)
    q = torch.cat([q, torch.tensor([-4.0, 10.0, 27.0, -3.0, 12.0, -4.5, 0.0])])
    logits = torch.stack([q, q.flip(0)]).to(device)
    labels = torch.tensor([q.numel(), 5], device=device)  # a background and a foreground row
    kw = dict(mode="bce", reduction="none", clamp=clamp, grad_mode=grad_mode)
    loss32, grad32 = run(compiled_backend(device), logits, labels, None, **kw)
    loss64, grad64 = run("reference", logits.double(), labels, None, **kw)
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-5, atol=1e-30)


def test_zero_weight_and_dropped_elements_still_surface_nan(device):
    # The CPU kernel computes only the kept elements (nonzero weight, not dropped); a NaN logit
    # on an element it skips must still poison the loss and its own gradient.
    logits, labels, _ = make_batch(6, 40, device, background=0.0)
    labels[:] = 1
    drop = torch.zeros(40, dtype=torch.bool, device=device)
    drop[7] = True  # a foreground row never trains a drop-class negative
    class_weight = torch.ones(40, device=device)
    class_weight[9] = 0.0
    for column in (7, 9):
        x = logits.clone()
        x[2, column] = float("nan")
        for backend in (compiled_backend(device), "reference"):
            loss, grad = run(backend, x, labels, drop, class_weight=class_weight, seed=3)
            assert torch.isnan(loss), (column, backend)
            assert torch.isnan(grad[2, column]), (column, backend)
            finite = torch.ones_like(grad, dtype=torch.bool)
            finite[2, column] = False
            assert bool(torch.isfinite(grad[finite]).all()), (column, backend)
            assert bool((grad[:, column][finite[:, column]] == 0).all()), (column, backend)


def test_nan_row_weight_surfaces_in_the_whole_row(device):
    logits, labels, drop = make_batch(6, 40, device, background=0.5)
    row_weight = torch.ones(6, device=device)
    row_weight[4] = float("nan")
    for backend in (compiled_backend(device), "reference"):
        loss, grad = run(backend, logits, labels, drop, row_weight=row_weight, seed=2)
        assert torch.isnan(loss), backend
        assert not bool(torch.isfinite(grad[4]).any()), backend
        assert bool(torch.isfinite(grad[[0, 1, 2, 3, 5]]).all()), backend


def test_reused_output_buffers_are_fully_rewritten(device):
    # The CPU op hands a freed N x C output buffer out again (csrc/cpu/huge_pages.h): every
    # element of a reused buffer must be written, ignored rows and skipped elements included.
    logits, labels, drop = make_batch(1100, 1203, device, ignored=0.2)
    labels = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    kw = dict(ignore_index=-1, seed=5)
    first = run(compiled_backend(device), logits, labels, drop, **kw)[1].clone()
    for _ in range(2):  # the second call's grad reuses the first call's freed buffer
        garbage = run(compiled_backend(device), logits * 3 + 1, labels, drop, **kw)[1]
        del garbage
        again = run(compiled_backend(device), logits, labels, drop, **kw)[1]
        assert torch.equal(again, first)
        del again
    none_kw = dict(kw, reduction="none")
    expected = gk.gol_loss(logits, labels, drop, backend="reference", **none_kw)
    for _ in range(2):
        torch.testing.assert_close(
            gk.gol_loss(logits, labels, drop, backend=compiled_backend(device), **none_kw),
            expected, rtol=1e-5, atol=1e-6)


def test_identical_dropped_elements(device):
    # All classes are drop classes and all rows but one foreground row are background, so the
    # loss of a background element is exactly zero iff it was dropped (for q > -2: below,
    # -log(1 - p) underflows to 0 in float32).
    n, c = 200, 1203
    logits, labels, _ = make_batch(n, c, device, background=1.0)
    logits = logits.clamp(-2.0, 8.0)
    labels[0] = 5
    labels[1] = 6
    drop = torch.ones(c, dtype=torch.bool, device=device)
    drop[6] = False  # ratio = 1/2
    kw = dict(reduction="none", seed=0xDEADBEEFCAFE, offset=11)
    ours = gk.gol_loss(logits, labels, drop, backend=compiled_backend(device), **kw)
    ref = gk.gol_loss(logits, labels, drop, backend="reference", **kw)
    dropped_ours = (ours[2:] == 0) & drop[None, :]
    dropped_ref = (ref[2:] == 0) & drop[None, :]
    assert torch.equal(dropped_ours, dropped_ref)
    u = reference.philox_uniform(n, c, 0xDEADBEEFCAFE, 11, device)[2:]
    assert torch.equal(dropped_ref, (u > 0.5) & drop[None, :])


def test_drop_statistics(device):
    # A background element of a drop class is kept with probability ratio = P(u <= ratio).
    n, c = 2000, 100
    labels = torch.full((n,), c, dtype=torch.int64)
    labels[:400] = torch.arange(400) % c  # foreground rows over all classes
    drop = torch.zeros(c, dtype=torch.bool)
    drop[:30] = True
    ratio = float(drop[labels[:400]].sum()) / 400
    logits = torch.zeros(n, c, device=device)
    loss = gk.gol_loss(logits, labels.to(device), drop.to(device), reduction="none", seed=77,
                       backend=compiled_backend(device))
    kept = (loss[400:, :30] != 0).float().mean().item()
    assert abs(kept - ratio) < 4 * (ratio * (1 - ratio) / (1600 * 30)) ** 0.5
    assert bool((loss[400:, 30:] != 0).all())  # other classes are never dropped


def test_no_foreground_drops_nothing(device):
    logits, labels, drop = make_batch(30, 50, device, background=1.0)
    dropped = gk.gol_loss(logits, labels, drop, seed=1, backend=compiled_backend(device))
    kept = gk.gol_loss(logits, labels, drop, mode="bce", seed=1, backend=compiled_backend(device))
    torch.testing.assert_close(dropped, kept)


def test_reference_mode_dead_zone(device):
    # A positive at q in (-4, -3.32) gets ~0 from BCE's backward but -exp(-q) from eq. 9.
    logits = torch.tensor([[-3.8, 0.0], [-3.0, 0.0]], device=device)
    labels = torch.tensor([0, 0], device=device)
    _, ref_grad = run(compiled_backend(device), logits, labels, None, reduction="sum", mode="bce")
    _, exact_grad = run(compiled_backend(device), logits, labels, None, reduction="sum",
                        mode="bce", grad_mode="exact")
    assert abs(ref_grad[0, 0].item()) < 1e-6 * abs(exact_grad[0, 0].item())
    assert exact_grad[0, 0].item() == pytest.approx(-torch.exp(torch.tensor(3.8)).item(), rel=1e-5)
    assert ref_grad[1, 0].item() == pytest.approx(exact_grad[1, 0].item(), rel=1e-2)


def test_gradcheck_float64(device):
    g = torch.Generator().manual_seed(0)
    logits = (torch.rand(6, 9, generator=g, dtype=torch.float64) * 10 - 3.5).to(device)
    labels = torch.tensor([0, 3, 9, 9, 8, 2], device=device)
    drop = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.bool, device=device)
    row_weight = torch.rand(6, generator=g, dtype=torch.float64).to(device)
    for kw in (dict(grad_mode="exact"), dict(grad_mode="reference", mode="eql"),
               dict(activation="sigmoid", reduction="none"), dict(reduction="sum")):
        fn = lambda x: gk.gol_loss(x, labels, drop, seed=4, row_weight=row_weight,
                                   backend=compiled_backend(device), **kw)
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
def test_opcheck(device, reduction):
    logits, labels, drop = make_batch(12, 33, device, dtype=torch.float64)
    args = op_args(logits.requires_grad_(), labels, drop, reduction=reduction)
    torch.library.opcheck(torch.ops.gumbel.gol_loss.default, args)
    torch.library.opcheck(torch.ops.gumbel.gumbel_activation.default, (logits.detach(),))


def test_op_called_directly_is_differentiable(device):
    logits, labels, drop = make_batch(10, 20, device)
    x = logits.clone().requires_grad_()
    loss, saved = torch.ops.gumbel.gol_loss(*op_args(x, labels, drop))
    (2.5 * loss).backward()
    torch.testing.assert_close(x.grad, 2.5 * saved)


def test_torch_compile_fullgraph(device):
    logits, labels, drop = make_batch(24, 1203, device)

    def step(x):
        return gk.gol_loss(x, labels, drop, seed=3, backend=compiled_backend(device)) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = logits.clone().requires_grad_()
    compiled(x1).backward()
    x2 = logits.clone().requires_grad_()
    step(x2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_non_unit_upstream_gradient(device):
    logits, labels, drop = make_batch(20, 40, device)
    _, unit = run(compiled_backend(device), logits, labels, drop, seed=2)
    _, scaled = run(compiled_backend(device), logits, labels, drop, seed=2,
                    upstream=torch.tensor(-3.5, device=device))
    torch.testing.assert_close(scaled, -3.5 * unit)
    upstream = torch.randn(20, 40, device=device)
    for backend in (compiled_backend(device), "reference"):
        _, elementwise = run(backend, logits, labels, drop, seed=2, reduction="none",
                             upstream=upstream)
        _, ones = run(backend, logits, labels, drop, seed=2, reduction="none")
        torch.testing.assert_close(elementwise, upstream * ones)


def test_retained_graph_backward(device):
    # CPU: the saved gradient is never mutated, so a retained graph backpropagates twice.
    # CUDA: a non-unit upstream gradient is applied in place (no host sync), so a second
    # backward must refuse rather than return a twice-scaled gradient.
    logits, labels, drop = make_batch(4, 5, device)
    x = logits.clone().requires_grad_()
    loss = gk.gol_loss(x, labels, drop, seed=1, backend=compiled_backend(device))
    (3.0 * loss).backward(retain_graph=True)
    first = x.grad.clone()
    if device == "cpu":
        (3.0 * loss).backward()
        torch.testing.assert_close(x.grad, 2 * first)
    else:
        with pytest.raises(RuntimeError, match="backward ran twice"):
            (3.0 * loss).backward()


def test_deterministic_across_runs_and_threads(device):
    logits, labels, drop = make_batch(515, 1203, device)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (1, 2, 1, 2):
            torch.set_num_threads(num_threads)
            results.append(run(compiled_backend(device), logits, labels, drop, seed=11))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_seed_none_follows_manual_seed(device):
    logits, labels, drop = make_batch(50, 60, device)
    losses = []
    for _ in range(2):
        torch.manual_seed(123)
        losses.append(gk.gol_loss(logits, labels, drop, backend=compiled_backend(device)))
    assert torch.equal(losses[0], losses[1])


def test_nan_and_inf_logits_give_non_finite_loss(device):
    logits, labels, drop = make_batch(8, 30, device)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = logits.clone()
        x[3, 4] = bad
        for backend in (compiled_backend(device), "reference"):
            loss, grad = run(backend, x, labels, drop, seed=1)
            assert not torch.isfinite(loss), (bad, backend)
            assert not bool(torch.isfinite(grad[3, 4])), (bad, backend)


def test_empty_batch(device):
    logits = torch.zeros(0, 1203, device=device, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.int64, device=device)
    loss = gk.gol_loss(logits, labels, backend=compiled_backend(device))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.shape == (0, 1203)
    none = gk.gol_loss(logits, labels, reduction="none", backend=compiled_backend(device))
    assert none.shape == (0, 1203)


def test_non_contiguous_inputs(device):
    logits, labels, drop = make_batch(30, 41, device)
    wide = torch.zeros(41, 60, device=device)
    wide[:, :30] = logits.t()
    strided = wide[:, :30].t()
    assert not strided.is_contiguous()
    labels2 = torch.stack([labels, labels], 1)[:, 0]
    a = run(compiled_backend(device), strided, labels2, drop, seed=4)
    b = run(compiled_backend(device), logits, labels, drop, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_int32_labels(device):
    logits, labels, drop = make_batch(30, 41, device)
    a = gk.gol_loss(logits, labels.int(), drop, seed=4, backend=compiled_backend(device))
    b = gk.gol_loss(logits, labels, drop, seed=4, backend=compiled_backend(device))
    assert torch.equal(a, b)


def test_gumbel_activation(device):
    q = torch.tensor([-50.0, -3.0, 0.0, 2.0, 50.0], device=device)
    scores = gk.gumbel_activation(q)
    torch.testing.assert_close(scores, torch.exp(-torch.exp(-q)))
    x = q.clone().requires_grad_()
    gk.gumbel_activation(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.exp(-torch.exp(-q)) * torch.exp(-q))
    half = gk.gumbel_activation(q.half())
    assert half.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_flat_index_beyond_int32():
    # N * C > 2^31: the last rows are only right if every flat index is 64-bit.
    c = 1204
    n = 2 ** 31 // c + 3
    logits = torch.zeros(n, c, dtype=torch.float16, device="cuda")
    tail = torch.randn(3, c, device="cuda").half() * 3
    logits[-3:] = tail
    labels = torch.full((n,), c, dtype=torch.int64, device="cuda")
    labels[-2] = 17
    loss = gk.gol_loss(logits, labels, None, mode="bce", reduction="none", backend="cuda")
    expected = gk.gol_loss(tail.float().cpu(), labels[-3:].cpu(), None, mode="bce",
                           reduction="none", backend="reference")
    torch.testing.assert_close(loss[-3:].float().cpu(), expected, rtol=2e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bad_label_is_reported_not_read():
    logits = torch.randn(4, 6, device="cuda")
    labels = torch.tensor([0, 6, 1000000, 2], device="cuda")
    with pytest.raises(ValueError, match=r"labels\[2\] = 1000000"):
        torch.ops.gumbel.gol_loss(logits, labels, None, None, None, torch.tensor([1]))
