"""What a training run leaves besides the rolling checkpoint: model snapshots at the lr steps and
the end (evaluable with --eval-only, identical after an interrupted and resumed run), and the
per-iteration report (log.jsonl fields, progress-bar fields, log lines, ETA, TensorBoard, the
loss-curve plot with its throughput panel)."""
import json
import logging
import sys
import types

import pytest
import torch

from gumbel_kernels import train as train_cli
from gumbel_kernels.engine.checkpoint import load_checkpoint
from gumbel_kernels.engine.plots import plot_loss_curve
from gumbel_kernels.engine.run_log import RunLog, format_duration
from gumbel_kernels.engine.trainer import snapshot_name

from test_train import tiny_config  # noqa: F401 (a fixture)

SOLVER = {"snapshots": "steps"}


def test_snapshot_points():
    steps, total = [16, 22], 24
    names = {i: snapshot_name(i, e, SOLVER, steps, total)
             for i, e in [(15, None), (16, 16), (20, 20), (22, None), (24, 24)]}
    assert names == {15: None, 16: "epoch_16.pt", 20: None, 22: "iter_0000022.pt",
                     24: "epoch_24.pt"}
    every = {"snapshots": "epochs"}
    assert snapshot_name(20, 20, every, steps, total) == "epoch_20.pt"
    assert snapshot_name(21, None, every, steps, total) is None
    assert snapshot_name(16, 16, {"snapshots": "none"}, steps, total) is None


def _state(path):
    return load_checkpoint(str(path))["model"]


def test_snapshots_evaluate_and_survive_a_resume(tiny_config, tmp_path):  # noqa: F811
    # One epoch of the tiny set: 4 iterations, lr steps (1x at 8/12 and 11/12) at 3 and 4.
    common = ["--config", str(tiny_config), "--no-progress", "--no-eval",
              "--set", "solver.epochs=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_cli.main(common + ["--out", str(straight)])
    names = sorted(p.name for p in (straight / "snapshots").iterdir())
    assert names == ["epoch_01.pt", "iter_0000003.pt"]
    final = load_checkpoint(str(straight / "snapshots" / "epoch_01.pt"))
    assert final["iteration"] == 4 and final["epochs_completed"] == 1
    assert set(final) >= {"model", "config"} and "optimizer" not in final  # model only
    for key, value in _state(straight / "checkpoint.pt").items():
        assert torch.equal(final["model"][key], value)
    before_step = _state(straight / "snapshots" / "iter_0000003.pt")
    assert not torch.equal(before_step["roi_heads.box_predictor.cls_score.weight"],
                           final["model"]["roi_heads.box_predictor.cls_score.weight"])

    train_cli.main(common + ["--out", str(resumed), "--max-iters", "2"])
    assert not (resumed / "snapshots").exists()
    train_cli.main(common + ["--out", str(resumed), "--resume"])
    for name in names:
        a, b = _state(straight / "snapshots" / name), _state(resumed / "snapshots" / name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)

    metrics = train_cli.main(["--config", str(tiny_config), "--no-progress", "--eval-only",
                              "--checkpoint", str(straight / "snapshots" / "iter_0000003.pt"),
                              "--out", str(tmp_path / "eval_iter3")])
    assert set(metrics) >= {"AP", "APb"}
    # A new run into the folder (--overwrite) removes the earlier run's snapshots too.
    with pytest.raises(FileExistsError, match="snapshots/"):
        train_cli._prepare_output_dir(str(resumed), overwrite=False)
    train_cli._prepare_output_dir(str(straight), overwrite=True)
    assert not (straight / "snapshots").exists() and not (straight / "checkpoint.pt").exists()


def test_log_records_bar_fields_and_lines(tmp_path, caplog):
    log = RunLog(str(tmp_path), total_iters=10, start_iteration=0, resumed=False,
                 device=torch.device("cpu"), tensorboard=False, log_every=5, lines=True)
    with caplog.at_level(logging.INFO, logger="gumbel_kernels.engine.run_log"):
        for i, seconds in enumerate([3.0, 1.0, 2.0, 9.0, 2.0], 1):
            record = log.record(iteration=i, epoch=0, lr=0.02, iter_time=seconds,
                                data_time=0.25, losses={"loss": 1.5, "loss_mask": 0.5})
    log.close()
    assert record["eta_seconds"] == pytest.approx(2.0 * 5)  # median of the times x 5 left
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1]) == record
    assert set(record) == {"iteration", "epoch", "lr", "loss", "loss_mask", "time",
                           "data_time", "eta_seconds"}  # max_mem_mb: on a GPU only
    assert log.bar_fields(record) == {"loss": "1.500", "mask": "0.500", "lr": "2.00e-02",
                                      "time": "2.00s", "data": "0.25s"}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("iter 5/10 epoch 0 lr 2.000e-02 ")
    assert "loss_mask 0.5000" in messages[0] and "eta 0:00:10" in messages[0]
    assert format_duration(90061) == "1 day, 1:01:01"


def test_a_resumed_log_drops_what_is_trained_again(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"iteration": i, "loss": 1.0}) + "\n" for i in (1, 2, 3))
                    + '{"iteration": 4, "lo')
    log = RunLog(str(tmp_path), total_iters=5, start_iteration=2, resumed=True,
                 device=torch.device("cpu"), tensorboard=False)
    log.record(iteration=3, epoch=0, lr=0.1, losses={"loss": 2.0}, iter_time=1.0, data_time=0.0)
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3] and records[-1]["loss"] == 2.0


class _FakeWriter:
    made = []

    def __init__(self, folder, purge_step=None):
        self.folder, self.purge_step, self.scalars, self.closed = folder, purge_step, [], False
        _FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=_FakeWriter))
    log = RunLog(str(tmp_path), total_iters=4, start_iteration=2, resumed=True,
                 device=torch.device("cpu"), tensorboard="auto")
    log.record(iteration=3, epoch=1, lr=0.01, losses={"loss": 0.7, "loss_box_reg": 0.2},
               iter_time=0.5, data_time=0.1)
    log.close()
    writer = _FakeWriter.made[-1]
    assert writer.folder == str(tmp_path / "tensorboard") and writer.purge_step == 3
    assert ("train/loss_box_reg", 0.2, 3) in writer.scalars
    assert {tag for tag, _, _ in writer.scalars} == {
        "train/lr", "train/loss", "train/loss_box_reg", "train/time", "train/data_time",
        "train/eta_seconds"}
    assert writer.closed


def test_tensorboard_true_without_it_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match="solver.tensorboard=true"):
        RunLog(str(tmp_path), total_iters=1, start_iteration=0, resumed=False,
               device=torch.device("cpu"), tensorboard=True)
    quiet = RunLog(str(tmp_path), total_iters=1, start_iteration=0, resumed=False,
                   device=torch.device("cpu"), tensorboard="auto")
    assert quiet.writer is None
    quiet.close()


def test_real_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    log = RunLog(str(tmp_path), total_iters=2, start_iteration=0, resumed=False,
                 device=torch.device("cpu"), tensorboard=True)
    log.record(iteration=1, epoch=0, lr=0.1, losses={"loss": 1.0}, iter_time=1.0, data_time=0.0)
    log.close()
    events = [p.name for p in (tmp_path / "tensorboard").iterdir()]
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_the_loss_curve_draws_the_throughput_panel(tmp_path):
    records = [{"iteration": i, "lr": 0.02, "loss": 2.0 / i, "loss_mask": 1.0 / i, "time": 0.5,
                "data_time": 0.05, "max_mem_mb": 9000.0 + i} for i in range(1, 30)]
    path = plot_loss_curve(records, str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").stat().st_size > 10_000 and path.endswith("curve.png")
