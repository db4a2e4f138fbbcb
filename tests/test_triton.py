"""The Triton backend (gumbel_kernels.triton.gol_loss) against the pure-PyTorch reference.

Runs under TRITON_INTERPRET=1 on CPU tensors (the variable must be set before triton is
imported: `TRITON_INTERPRET=1 python -m pytest tests/test_triton.py`, the second pytest run of
`make test`), compiled where a GPU is present; skipped otherwise. The interpreter is slow, so
the shapes are small.
"""
import itertools
import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("the Triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 set before triton is "
                "imported (run: TRITON_INTERPRET=1 python -m pytest tests/test_triton.py)",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gumbel_kernels import reference  # noqa: E402
from gumbel_kernels.triton import gol_loss as triton_gol  # noqa: E402
from gumbel_kernels.triton.gol_loss import _philox_uniforms  # noqa: E402

DEVICE = "cpu" if INTERPRETED else "cuda"
# The interpreter evaluates overflowing lanes (masked ones included) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def make_batch(n=13, c=33, *, seed=0, background=0.4, ignored=0.1, dtype=torch.float32,
               drop_fraction=0.4):
    """Logits around the clamp bounds, a mix of foreground / background / ignored rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 4
    special = torch.tensor([-4.0, 10.0, -4.5, 10.5, -3.5, 0.0, -3.9, 9.9, 25.0, -30.0])
    logits.view(-1)[: special.numel()] = special[: logits.numel()]
    labels = torch.randint(0, c, (n,), generator=g)
    draw = torch.rand(n, generator=g)
    labels[draw < background] = c
    labels[draw > 1 - ignored] = -100
    drop = torch.rand(c, generator=g) < drop_fraction
    return logits.to(DEVICE, dtype), labels.to(DEVICE), drop.to(DEVICE)


def forward_args(logits, labels, drop, *, mode="droploss", activation="gumbel",
                 reduction="mean", clamp=(-4.0, 10.0), grad_mode="reference", class_weight=None,
                 row_weight=None, ignore_index=-100, seed=0, offset=0, need_grad=True):
    clamp_min, clamp_max = clamp if clamp is not None else (None, None)
    return (logits, labels, drop, class_weight, row_weight,
            torch.tensor([seed], dtype=torch.int64), offset, mode, activation, reduction,
            clamp_min, clamp_max, grad_mode, ignore_index, need_grad)


def both(logits, labels, drop, **kw):
    args = forward_args(logits, labels, drop, **kw)
    return triton_gol.gol_loss_forward(*args), reference.gol_loss_forward(*args)


def check(logits, labels, drop, rtol=1e-5, atol=1e-6, **kw):
    ours, ref = both(logits, labels, drop, **kw)
    for name, a, b in zip(("loss", "grad"), ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, name
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    return ours, ref


@pytest.mark.parametrize("mode, activation, reduction, grad_mode", list(itertools.product(
    ("bce", "eql", "droploss"), ("gumbel", "sigmoid"), ("mean", "sum", "none"),
    ("reference", "exact"))))
def test_matches_reference(mode, activation, reduction, grad_mode):
    logits, labels, drop = make_batch()
    check(logits, labels, drop, mode=mode, activation=activation, reduction=reduction,
          grad_mode=grad_mode, seed=2 ** 40 + 3, offset=2 ** 33 + 1)


@pytest.mark.parametrize("n, c, background, ignored", [
    (1, 7, 0.0, 0.0),     # one foreground row
    (9, 7, 1.0, 0.0),     # all background: no foreground row, nothing dropped
    (17, 13, 0.0, 0.0),   # no background row
    (5, 1, 0.5, 0.0),     # a single class
    (64, 33, 0.6, 0.2),   # rows start at every residue mod 4
    (6, 8, 0.5, 0.0),     # rows aligned to Philox groups
])
def test_shapes(n, c, background, ignored):
    logits, labels, drop = make_batch(n, c, seed=n + c, background=background, ignored=ignored)
    for reduction in ("mean", "none"):
        check(logits, labels, drop, seed=3, reduction=reduction)


def test_weights_and_clamps():
    logits, labels, drop = make_batch()
    g = torch.Generator().manual_seed(1)
    class_weight = (torch.rand(33, generator=g) + 0.5).to(DEVICE)
    row_weight = (torch.rand(13, generator=g) + 0.5).to(DEVICE)
    row_weight[2] = 0.0
    for clamp, reduction in itertools.product(
            [None, (-2.0, None), (None, 3.0), (-3.0, 6.0), (-4.1, 12.3)], ("sum", "none")):
        check(logits, labels, drop, clamp=clamp, class_weight=class_weight,
              row_weight=row_weight, seed=9, reduction=reduction)
    check(logits, labels, drop, class_weight=class_weight, seed=9)
    check(logits, labels, drop, row_weight=row_weight, seed=9, activation="sigmoid")


@pytest.mark.parametrize("dtype, rtol, atol", [
    (torch.float16, 2e-3, 1e-4), (torch.bfloat16, 2e-2, 1e-3), (torch.float64, 1e-10, 1e-12)])
def test_dtypes(dtype, rtol, atol):
    logits, labels, drop = make_batch(dtype=dtype)
    weights = {}
    if dtype == torch.float64:
        weights = dict(class_weight=torch.linspace(0.5, 1.5, 33, dtype=dtype, device=DEVICE))
    for activation, reduction in itertools.product(("gumbel", "sigmoid"), ("mean", "none")):
        (loss, grad), _ = check(logits, labels, drop, rtol=rtol, atol=atol, seed=4,
                                activation=activation, reduction=reduction,
                                clamp=(-3.3, 7.7), **weights)
        assert grad.dtype == dtype
        assert loss.dtype == (dtype if reduction == "none" else
                              torch.float64 if dtype == torch.float64 else torch.float32)


def _drop_batch(n=40, c=33):
    """Background rows whose every class is a drop class, so a dropped element is exactly the
    one with loss 0: the logits keep -log(1 - p) > 0 everywhere else."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.rand(n, c, generator=g) * 10 - 2).to(DEVICE)
    labels = torch.full((n,), c, dtype=torch.int64)
    labels[:6] = torch.tensor([4, 5, 9, 5, 30, 5])  # 3 of 6 foreground rows of drop classes
    drop = torch.ones(c, dtype=torch.bool)
    drop[5] = False
    return logits, labels.to(DEVICE), drop.to(DEVICE)


@pytest.mark.parametrize("seed, offset", [
    (0, 0), (0xDEADBEEFCAFE, 11), (-1, 2 ** 32 - 1), (-(2 ** 63), 2 ** 32 + 7),
    (2 ** 63 - 1, 2 ** 64 - 1), (2 ** 31, 2 ** 31)])
def test_identical_dropped_elements(seed, offset):
    logits, labels, drop = _drop_batch()
    (ours, _), (ref, _) = both(logits, labels, drop, reduction="none", seed=seed, offset=offset)
    dropped = ours[6:] == 0
    assert torch.equal(dropped, ref[6:] == 0)
    # ratio = 3/6: about half of the background elements are dropped.
    assert 0.3 < dropped.float().mean().item() < 0.7
    # The same mask straight from the SPEC.md stream.
    u = reference.philox_uniform(logits.shape[0], logits.shape[1], seed, offset, DEVICE)
    assert torch.equal(dropped, (u[6:] > 0.5) & drop[None, :])


def test_drop_ratio_edges():
    logits, labels, drop = _drop_batch()
    # No foreground row (GOL's ratio is NaN): nothing is dropped.
    background_only = torch.full_like(labels, logits.shape[1])
    (loss, _), _ = check(logits, background_only, drop, reduction="none", seed=1)
    assert bool((loss != 0).all())
    # Every foreground row of a drop class: ratio 1, nothing is dropped either.
    all_drop = labels.clone()
    all_drop[:6] = 4
    (loss, _), _ = check(logits, all_drop, drop, reduction="none", seed=1)
    assert bool((loss[6:] != 0).all())
    # A ratio that float32 has to round (1/3), with ignored rows in the counts' way.
    third = labels.clone()
    third[:6] = torch.tensor([4, 5, 5, -100, -100, -100], device=DEVICE)
    check(logits, third, drop, reduction="none", seed=2)
    check(logits, third, drop, reduction="mean", seed=2, ignore_index=-100)


@triton.jit(do_not_specialize=["seed", "first_group", "offset_lo", "offset_hi"])
def _uniforms_kernel(out_ptr, seed, first_group, offset_lo, offset_hi,
                     BLOCK_GROUPS: tl.constexpr):
    u = _philox_uniforms(seed, first_group, offset_lo, offset_hi, BLOCK_GROUPS)
    flat = tl.arange(0, BLOCK_GROUPS)[:, None] * 4 + tl.arange(0, 4)[None, :]
    tl.store(out_ptr + flat, u)


def test_philox_counters_beyond_32_bits():
    # Flat indices past 2^34 (N * C > 2^31) use hi32(e >> 2) as the second counter word: check
    # the helper against the reference Philox without allocating such a matrix.
    first_group, seed, offset = 2 ** 34 + 2 ** 32 - 3, -(2 ** 62) - 5, 2 ** 40 + 9
    out = torch.empty(32, dtype=torch.float32, device=DEVICE)
    seed64 = seed & (2 ** 64 - 1)
    _uniforms_kernel[(1,)](out, seed64, first_group, offset & 0xFFFFFFFF, offset >> 32,
                           BLOCK_GROUPS=8)
    g = torch.arange(first_group, first_group + 8, dtype=torch.int64)
    counter = (g & 0xFFFFFFFF, g >> 32, torch.full_like(g, offset & 0xFFFFFFFF),
               torch.full_like(g, offset >> 32))
    words = torch.stack(reference.philox4x32_10(counter, (seed64 & 0xFFFFFFFF, seed64 >> 32)),
                        dim=1).reshape(-1)
    expected = (words >> 8).to(torch.float32) * 2.0 ** -24
    assert torch.equal(out.cpu(), expected)


def test_philox_known_answer():
    # Random123's known answer: counter 0, key 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
    out = torch.empty(4, dtype=torch.float32, device=DEVICE)
    _uniforms_kernel[(1,)](out, 0, 0, 0, 0, BLOCK_GROUPS=1)
    # (a [1, 4] block: the four words of one call)
    words = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert out.cpu().tolist() == [(w >> 8) * 2.0 ** -24 for w in words]


def test_need_grad_false_and_determinism():
    logits, labels, drop = make_batch()
    (loss, grad), (ref, _) = both(logits, labels, drop, seed=1, need_grad=False)
    assert grad.numel() == 0
    torch.testing.assert_close(loss, ref)
    first = triton_gol.gol_loss_forward(*forward_args(logits, labels, drop, seed=7))
    again = triton_gol.gol_loss_forward(*forward_args(logits, labels, drop, seed=7))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_and_fully_ignored(reduction):
    empty = torch.zeros(0, 7, device=DEVICE)
    (loss, grad), (ref, ref_grad) = both(empty, torch.zeros(0, dtype=torch.int64, device=DEVICE),
                                         None, reduction=reduction)
    assert loss.shape == ref.shape and grad.shape == ref_grad.shape == (0, 7)
    if reduction != "none":
        assert loss.item() == 0.0
    logits, labels, drop = make_batch(5, 7)
    labels = torch.full_like(labels, -1)
    (loss, grad), _ = check(logits, labels, drop, reduction=reduction, ignore_index=-1)
    assert bool((grad == 0).all()) and bool((loss == 0).all())


def test_non_finite_logits_surface():
    logits, labels, drop = make_batch(6, 7, ignored=0.0)
    logits[0, 1], logits[1, 2], logits[2, 3] = float("nan"), float("inf"), -float("inf")
    for activation in ("gumbel", "sigmoid"):
        (loss, grad), (ref, ref_grad) = both(logits, labels, drop, activation=activation)
        assert not bool(loss.isfinite()) and not bool(ref.isfinite())
        assert torch.equal(grad.isnan(), ref_grad.isnan())


def test_scale_grad():
    grad = torch.randn(5, 7, device=DEVICE)
    before = grad.clone()
    triton_gol.scale_grad_(grad, torch.tensor(1.0, device=DEVICE))
    assert torch.equal(grad, before)
    triton_gol.scale_grad_(grad, torch.tensor(2.5, device=DEVICE))
    torch.testing.assert_close(grad, 2.5 * before, rtol=0, atol=0)
    upstream = torch.randn(5, 7, device=DEVICE)
    triton_gol.scale_grad_(grad, upstream)
    torch.testing.assert_close(grad, 2.5 * before * upstream)
    # float64 scaling stays float64; half grads scale in float32 like torch's mul_.
    grad64 = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    scale64 = torch.tensor(1.0 / 3.0, dtype=torch.float64, device=DEVICE)
    expected = grad64 * scale64
    triton_gol.scale_grad_(grad64, scale64)
    assert torch.equal(grad64, expected)
    half = torch.randn(4, 9, device=DEVICE).half()
    expected = half.clone().mul_(torch.tensor(0.3, device=DEVICE))
    triton_gol.scale_grad_(half, torch.tensor(0.3, device=DEVICE))
    assert torch.equal(half, expected)
    triton_gol.scale_grad_(torch.empty(0, 7, device=DEVICE), torch.tensor(2.0, device=DEVICE))


def test_through_the_public_api():
    # End to end through the autograd Function, where the package imports.
    gk = pytest.importorskip("gumbel_kernels")
    logits, labels, drop = make_batch()
    results = []
    for backend in ("triton", "reference"):
        x = logits.clone().requires_grad_()
        loss = gk.gol_loss(x, labels, drop, seed=11, backend=backend)
        (loss * 3.0).backward()
        results.append((loss.detach(), x.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, c", [(3, 1203), (2, 1024), (5, 1025), (4, 13204), (40, 63)])
def test_tile_paths(n, c):
    # C >= 1024 walks two-row tiles (a compare per element), C < 1024 divides; tiles straddle
    # rows at every offset, and the last tile is partial.
    logits, labels, drop = make_batch(n, c, seed=c, background=0.5)
    for reduction in ("mean", "none"):
        check(logits, labels, drop, seed=8, reduction=reduction)


# Triton's exp compiles to ex2.approx of a rounded product; _exp carries the product's rounding
# error, leaving ~3 ulp, i.e. t = exp(-q) off by up to 2^-21 relative: the dense-grid tolerance
# is 1e-5 relative plus what a 2^-21 shift of q moves the float64 reference by (tests of the
# compiled kernels: tests/test_gol_loss.py, with CUDA's 2-ulp expf).
EXP_SHIFT = 2.0 ** -21


@pytest.mark.parametrize("clamp", [(-4.0, 10.0), (-3.0, 27.0), (-4.5, 12.0), None],
                         ids=["default-bounded", "custom-bounded", "series", "unclamped"])
@pytest.mark.parametrize("grad_mode", ["reference", "exact"])
def test_elements_match_float64_on_a_dense_grid(clamp, grad_mode):
    q = torch.linspace(-6.0, 30.0, 3001)
    q = torch.cat([q, torch.tensor([-4.0, 10.0, 27.0, -3.0, 12.0, -4.5, 0.0, -3.9, -3.4])])
    logits = torch.stack([q, q.flip(0)]).to(DEVICE)
    labels = torch.tensor([q.numel(), 5], device=DEVICE)
    kw = dict(mode="bce", reduction="none", clamp=clamp, grad_mode=grad_mode)
    ours = triton_gol.gol_loss_forward(*forward_args(logits, labels, None, **kw))
    exact = reference.gol_loss_forward(*forward_args(logits.double(), labels, None, **kw))
    shifted = [reference.gol_loss_forward(*forward_args(logits.double() + d, labels, None, **kw))
               for d in (EXP_SHIFT, -EXP_SHIFT)]
    for k, name in enumerate(("loss", "grad")):
        spread = torch.maximum((shifted[0][k] - exact[k]).abs(), (shifted[1][k] - exact[k]).abs())
        tolerance = 1e-5 * exact[k].abs() + spread + 1e-30
        error = (ours[k].double() - exact[k]).abs()
        worst = int(torch.argmax(error - tolerance))
        assert bool((error <= tolerance).all()), (name, logits.reshape(-1)[worst].item(),
                                                   ours[k].reshape(-1)[worst].item(),
                                                   exact[k].reshape(-1)[worst].item())


@pytest.mark.parametrize("grad_mode", ["reference", "exact"])
def test_unclamped_very_negative_logits_and_tiny_float64_losses(grad_mode):
    q = torch.tensor([[-88.0, -89.0, -200.0, -1e30], [-88.0, -89.0, -200.0, -1e30]], device=DEVICE)
    labels = torch.tensor([4, 0], device=DEVICE)
    (loss, grad), _ = check(q, labels, None, mode="bce", reduction="none", clamp=None,
                            grad_mode=grad_mode)
    assert bool(torch.isfinite(loss).all()) and bool((grad[0] == 0).all())
    q64 = torch.tensor([[-3.6, -3.7, -3.9]], dtype=torch.float64, device=DEVICE)
    (loss, _), _ = check(q64, torch.tensor([3], device=DEVICE), None, mode="bce",
                         reduction="none", rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, torch.exp(-torch.exp(-q64)), rtol=1e-12, atol=0)


def test_bad_labels_checked_on_the_device(monkeypatch):
    logits, labels, drop = make_batch(6, 9, ignored=0.0)
    bad = labels.clone()
    bad[2] = 10 ** 6
    bad[4] = -7
    with pytest.raises(ValueError, match=r"labels\[2\] = 1000000"):
        triton_gol.gol_loss_forward(*forward_args(logits, bad, drop))
    # Unchecked (no host read): the bad rows are NaN, the others exact.
    monkeypatch.setenv("GUMBEL_CUDA_CHECK_LABELS", "0")
    loss, grad = triton_gol.gol_loss_forward(*forward_args(logits, bad, drop, reduction="none"))
    good_loss, good_grad = triton_gol.gol_loss_forward(*forward_args(logits, labels, drop,
                                                                     reduction="none"))
    keep = torch.tensor([0, 1, 3, 5])
    assert bool(torch.isnan(loss[[2, 4]]).all()) and bool(torch.isnan(grad[[2, 4]]).all())
    assert torch.equal(loss[keep], good_loss[keep]) and torch.equal(grad[keep], good_grad[keep])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_match_the_reference(bad):
    logits, labels, drop = make_batch(12, 9, background=0.5, drop_fraction=0.6)
    for which, length in (("class_weight", 9), ("row_weight", 12)):
        weight = torch.ones(length, device=DEVICE)
        weight[3] = bad
        ours, ref = both(logits, labels, drop, reduction="none", seed=3, **{which: weight})
        for a, b in zip(ours, ref):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), which


def test_seed_tensor_on_the_device_drops_the_same_elements():
    logits, labels, drop = _drop_batch()
    args = list(forward_args(logits, labels, drop, reduction="none", seed=12345, offset=9))
    on_host = triton_gol.gol_loss_forward(*args)
    args[5] = args[5].to(DEVICE)
    on_device = triton_gol.gol_loss_forward(*args)
    assert torch.equal(on_host[0], on_device[0])


def test_registered_op_passes_opcheck():
    # Under the interpreter AOT dispatch cannot run: the interpreter reads the data pointers of
    # the fake tensors it traces with. Compiled (a GPU), every check runs.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not INTERPRETED:
        checks += ("test_aot_dispatch_dynamic",)
    logits, labels, drop = make_batch(5, 7)
    for reduction in ("mean", "none"):
        args = forward_args(logits.double().requires_grad_(), labels, drop, reduction=reduction)
        torch.library.opcheck(torch.ops.gumbel_triton.gol_loss.default, args, test_utils=checks)


def test_compiles_with_fullgraph_through_the_public_api():
    gk = pytest.importorskip("gumbel_kernels")
    logits, labels, drop = make_batch()

    def step(x):
        return gk.gol_loss(x, labels, drop, seed=3, backend="triton") * 2.0

    # Dynamo captures the whole step either way (fullgraph); AOT tracing runs the kernels on
    # fake tensors, which only the compiled (GPU) Triton can.
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True,
                             backend="eager" if INTERPRETED else "aot_eager")
    x1 = logits.clone().requires_grad_()
    compiled(x1).backward()
    x2 = logits.clone().requires_grad_()
    step(x2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.skipif(INTERPRETED or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_tensors_device():
    # Logits on cuda:1 while cuda:0 is current: the kernels must run on cuda:1.
    logits, labels, drop = [t.to("cuda:1") for t in make_batch()]
    with torch.cuda.device(0):
        ours = triton_gol.gol_loss_forward(*forward_args(logits, labels, drop, reduction="none"))
        grad = ours[1].clone()
        triton_gol.scale_grad_(grad, torch.tensor(2.0, device="cuda:1"))
    ref = reference.gol_loss_forward(*forward_args(logits.cpu(), labels.cpu(), drop.cpu(),
                                                   reduction="none"))
    torch.testing.assert_close(ours[0].cpu(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu(), 2 * ref[1], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(INTERPRETED, reason="needs a CUDA device (CUDA graphs)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replays_draw_fresh_drops(backend):
    # Captured with seed=None, every replay draws a new seed on the device (torch's CUDA
    # generator advances per replay): the dropped elements differ between replays; nothing
    # syncs with the host during the capture.
    gk = pytest.importorskip("gumbel_kernels")
    if backend == "cuda" and gk.backends.unavailable_reason("cuda", "cuda"):
        pytest.skip(gk.backends.unavailable_reason("cuda", "cuda"))
    logits, labels, drop = _drop_batch(64, 33)
    static_out = torch.empty(64, 33, device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        gk.gol_loss(logits, labels, drop, reduction="none", backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out.copy_(gk.gol_loss(logits, labels, drop, reduction="none", backend=backend))
    masks = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        masks.append((static_out[6:] == 0).clone())
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
