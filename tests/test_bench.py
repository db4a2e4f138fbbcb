"""The benchmark's baselines compute GOL's loss, its CSV keeps its schema, its plot draws.

The literal GOL code and the compile-friendly rewrite are checked against the reference
contract where no randomness is involved (no drop classes: plain BCE; no background rows: the
EQL part of DropLoss, dead zone and clamp edges included), and statistically on the random
background drop.
"""
import csv
import math

import pytest
import torch

from bench import common, gol_loss_bench, plot
from bench.literal_gol import compile_friendly_gol, literal_gol
from gumbel_kernels import reference

BASELINES = [pytest.param(literal_gol, id="literal"), pytest.param(compile_friendly_gol, id="rewrite")]
# The literal forms p = 1 / exp(exp(-q)) and BCE's 1 - p by subtraction, as GOL does: its loss
# and gradient on negatives near the upper clamp carry cancellation error. The rewrite does not.
TOLERANCES = {literal_gol: dict(rtol=2e-3, atol=1e-6), compile_friendly_gol: dict(rtol=1e-5, atol=1e-7)}


def reference_loss_and_grad(logits, labels, drop_classes, mode="droploss", seed=0):
    return reference.gol_loss_forward(
        logits, labels, drop_classes, None, None, torch.tensor([seed]), 0, mode, "gumbel",
        "mean", -4.0, 10.0, "reference", -100, True)


def loss_and_grad(fn, logits, labels, drop_classes):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, labels, drop_classes)
    loss.backward()
    return loss.detach(), x.grad


def interesting_logits(num_rows, num_classes, generator):
    logits = torch.randn(num_rows, num_classes, generator=generator) * 4.0 - 1.0
    logits[0, :8] = torch.tensor([-5.0, -4.0, -3.9, -3.5, -3.3, 9.9, 10.0, 12.0])
    return logits


@pytest.mark.parametrize("fn", BASELINES)
def test_no_drop_classes_is_plain_bce(fn):
    generator = torch.Generator().manual_seed(1)
    num_rows, num_classes = 48, 13
    logits = interesting_logits(num_rows, num_classes, generator)
    labels = torch.randint(0, num_classes + 1, (num_rows,), generator=generator)
    labels[:3] = torch.tensor([0, num_classes, 7])  # row 0: a positive in the dead zone
    no_drop = torch.zeros(num_classes, dtype=torch.bool)
    loss, grad = loss_and_grad(fn, logits, labels, no_drop)
    expected_loss, expected_grad = reference_loss_and_grad(logits, labels, None, mode="bce")
    torch.testing.assert_close(loss, expected_loss, **TOLERANCES[fn])
    torch.testing.assert_close(grad, expected_grad, **TOLERANCES[fn])


@pytest.mark.parametrize("fn", BASELINES)
def test_all_foreground_droploss_is_deterministic_and_matches(fn):
    generator = torch.Generator().manual_seed(2)
    num_rows, num_classes = 64, 29
    logits = interesting_logits(num_rows, num_classes, generator)
    labels = torch.randint(0, num_classes, (num_rows,), generator=generator)
    labels[0] = 3  # a positive at q = -3.5, in the dead zone of GOL's BCE backward
    drop_classes = torch.rand(num_classes, generator=generator) < 0.5
    drop_classes[labels[0]] = True
    loss, grad = loss_and_grad(fn, logits, labels, drop_classes)
    for mode in ("droploss", "eql"):
        expected_loss, expected_grad = reference_loss_and_grad(logits, labels, drop_classes, mode)
        torch.testing.assert_close(loss, expected_loss, **TOLERANCES[fn])
        torch.testing.assert_close(grad, expected_grad, **TOLERANCES[fn])
    # GOL's dead zone, kept by both: far below the analytic -exp(3.5) / N.
    assert abs(float(grad[0, 3])) < 0.01 * math.exp(3.5) / num_rows
    with torch.no_grad():
        torch.testing.assert_close(fn(logits, labels, drop_classes), expected_loss,
                                   **TOLERANCES[fn])


def _ours_reference(logits, labels, drop_classes):
    import gumbel_kernels as gk
    return gk.gol_loss(logits, labels, drop_classes, seed=int(torch.randint(0, 2 ** 62, ())),
                       backend="reference")


@pytest.mark.parametrize("fn", BASELINES + [pytest.param(_ours_reference, id="ours-reference")])
def test_background_drop_matches_in_distribution(fn):
    """E[loss] keeps a background drop-class negative with probability `ratio`; the observed
    loss must lie within 5 standard deviations of that expectation."""
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(3)
    num_rows, num_classes = 1024, 61
    logits = torch.randn(num_rows, num_classes, generator=generator) - 1.0
    foreground = torch.rand(num_rows, generator=generator) < 0.25
    labels = torch.where(foreground, torch.randint(0, num_classes, (num_rows,), generator=generator),
                         torch.full((num_rows,), num_classes))
    drop_classes = torch.rand(num_classes, generator=generator) < 0.6
    fg_labels = labels[foreground]
    ratio = float(drop_classes[fg_labels].float().mean())
    assert 0.3 < ratio < 0.9

    # Per-element losses with no background drop (EQL) and the background drop-class cells.
    per_element, _ = reference.gol_loss_forward(
        logits, labels, drop_classes, None, None, torch.tensor([0]), 0, "eql", "gumbel", "none",
        -4.0, 10.0, "reference", -100, False)
    random_cells = (~foreground)[:, None] & drop_classes[None, :]
    fixed = per_element[~random_cells].sum()
    random_losses = per_element[random_cells]
    expected = (fixed + ratio * random_losses.sum()) / num_rows
    std = math.sqrt(ratio * (1 - ratio) * float((random_losses ** 2).sum())) / num_rows

    for _ in range(3):
        with torch.no_grad():
            observed = float(fn(logits, labels, drop_classes))
        assert abs(observed - float(expected)) < 5 * std, (observed, float(expected), std)
    # And the drop is random: not everything, not nothing.
    assert std > 0 and abs(float(expected) - float(fixed / num_rows)) > 10 * std


def test_rewrite_under_torch_compile_matches_eager_rewrite():
    generator = torch.Generator().manual_seed(4)
    num_rows, num_classes = 32, 11
    logits = interesting_logits(num_rows, num_classes, generator)
    labels = torch.randint(0, num_classes + 1, (num_rows,), generator=generator)
    drop_classes = torch.rand(num_classes, generator=generator) < 0.5
    seed = torch.tensor(1234, dtype=torch.int32)
    compiled = torch.compile(compile_friendly_gol, dynamic=False)
    x_eager = logits.clone().requires_grad_()
    x_compiled = logits.clone().requires_grad_()
    loss_eager = compile_friendly_gol(x_eager, labels, drop_classes, seed)
    loss_compiled = compiled(x_compiled, labels, drop_classes, seed)
    loss_eager.backward()
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-5, atol=1e-7)


def _row(**overrides):
    row = {column: "" for column in common.CSV_COLUMNS}
    row.update(timestamp="2026-01-01T00:00:00+00:00", device="cpu", device_name="test cpu",
               commit="uncommitted", torch=torch.__version__, provider="eager", mode="full",
               N=16, C=7, dtype="float32", repeats=2, median_ms=2.0, p20_ms=1.5, p80_ms=2.5,
               copy_ms=0.01, time_vs_copy=200.0, peak_extra_mb=0.1, notes="test")
    row.update(overrides)
    return row


def test_csv_writer_writes_the_fixed_header_once(tmp_path):
    path = tmp_path / "results" / "bench.csv"
    common.append_rows([_row()], path)
    common.append_rows([_row(provider="ours", median_ms=0.5)], path)
    with open(path, newline="") as source:
        lines = list(csv.reader(source))
    assert tuple(lines[0]) == common.CSV_COLUMNS
    assert len(lines) == 3 and lines[1][common.CSV_COLUMNS.index("provider")] == "eager"
    assert [row["provider"] for row in common.read_rows(path)] == ["eager", "ours"]
    with pytest.raises(KeyError):
        common.append_rows([{"not_a_column": 1}], path)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        common.append_rows([_row()], other)


def test_plot_is_drawn_from_a_tiny_csv(tmp_path):
    path = tmp_path / "bench.csv"
    rows = []
    for provider, scale in (("eager", 10.0), ("compile_rewrite", 3.0), ("ours", 1.0)):
        for n in (512, 2048):
            for mode in ("forward", "full"):
                median = scale * n / 512
                rows.append(_row(provider=provider, N=n, C=1203, mode=mode, median_ms=median,
                                 p20_ms=0.9 * median, p80_ms=1.1 * median))
    # An older run of "ours" must not be drawn.
    rows.append(_row(provider="ours", timestamp="2025-01-01T00:00:00+00:00", N=512, C=1203,
                     median_ms=1e6))
    common.append_rows(rows, path)
    latest = plot.latest_rows(common.read_rows(path))
    assert all(float(row["median_ms"]) < 1e5 for row in latest)
    out = plot.plot(path, tmp_path / "plot.png")
    assert out.exists() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_bench_run_appends_rows(tmp_path, capsys):
    path = tmp_path / "gol_loss.csv"
    rows = gol_loss_bench.main(["--device", "cpu", "--providers", "eager,reference",
                                "--shapes", "16x7", "--repeats", "2", "--csv", str(path)])
    assert len(rows) == 4  # 2 providers x 2 modes
    written = common.read_rows(path)
    assert len(written) == 4
    assert {(r["provider"], r["mode"]) for r in written} == {
        (p, m) for p in ("eager", "reference") for m in ("forward", "full")}
    for row in written:
        assert row["N"] == "16" and row["C"] == "7" and row["repeats"] == "2"
        assert float(row["median_ms"]) > 0 and float(row["copy_ms"]) > 0
        assert float(row["peak_extra_mb"]) >= 0 and "mem=" in row["notes"]
        assert float(row["speedup_vs_eager"]) > 0
        assert row["speedup_vs_best_compile"] == ""  # no compile provider in this run
    assert "| provider | mode |" in capsys.readouterr().out


def test_inputs_are_lvis_like():
    inputs = gol_loss_bench.make_inputs(4096, 1203, torch.float32, torch.device("cpu"))
    drop_share = float(inputs.drop_classes.float().mean())
    assert 0.55 < drop_share < 0.75  # rare + common classes of LVIS v1
    foreground = inputs.labels < 1203
    assert 0.2 < float(foreground.float().mean()) < 0.3
    assert int(inputs.labels.max()) == 1203 and int(inputs.labels.min()) >= 0
    # Foreground classes follow the image counts, so few foreground rows are of a drop class.
    assert float(inputs.drop_classes[inputs.labels[foreground]].float().mean()) < 0.2
