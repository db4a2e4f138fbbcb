"""Command-line manners: a user error is one line on stderr (the traceback with --debug), and
every tool's help shows its defaults."""
import pathlib
import subprocess
import sys

import pytest

from gumbel_kernels import _cli
from gumbel_kernels import train as train_cli
from gumbel_kernels.analysis import __main__ as analysis_cli
from gumbel_kernels.classification import train_lt
from gumbel_kernels.data import synthetic
from gumbel_kernels.engine import plots

ROOT = pathlib.Path(__file__).resolve().parents[1]


def help_text(main, argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv + ["--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("main, argv, shown", [
    (train_cli.main, [], ["--debug", "--allow-pickle", "DANGEROUS", "--overwrite"]),
    (train_lt.main, [], ["(default: 0.1)", "(default: 32)", "(default: balanced)"]),
    (synthetic.main, [], ["(default: 30)", "(default: 256)"]),
    (plots.main, [], ["(default: 20)"]),
    (analysis_cli.main, ["weight-norms"], ["(default: roi_heads.box_predictor.cls_score.weight)",
                                           "(default: auto)", "DANGEROUS"]),
    (analysis_cli.main, ["kl"], ["(default: 1e-06)", "(default: 20)"]),
    (analysis_cli.main, ["distributions"], ["(default: 20)"]),
])
def test_help_shows_the_defaults(main, argv, shown, capsys):
    text = help_text(main, argv, capsys)
    for part in shown:
        assert part in text, part
    assert "(default: None)" not in text and "(default: False)" not in text


def test_a_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("solver:\n  checkpoint_evry: 3\n")
    command = [sys.executable, "-m", "gumbel_kernels.train", "--config", str(config)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {config}: unknown key solver.checkpoint_evry (did you mean "
        f"solver.checkpoint_every?) (--debug shows the traceback)"]
    result = subprocess.run(command + ["--debug"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "ConfigError" in result.stderr


@pytest.mark.parametrize("main, argv, message", [
    (train_lt.main, ["--data-root", "/nonexistent/cifar", "--out", "{tmp}/o"],
     "error: --data-root /nonexistent/cifar: no CIFAR-100 copy"),
    (analysis_cli.main, ["weight-norms", "--checkpoint", "{tmp}/none.pt", "--ann", "{tmp}/a.json",
                         "--out", "{tmp}/o"], "error: "),
    (plots.main, ["{tmp}/missing"], "error: {tmp}/missing does not exist"),
    (train_cli.main, ["--config", "{tmp}/none.yaml"], "error: config file not found"),
])
def test_every_tool_reports_user_errors_in_one_line(main, argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert _cli.run(main, argv) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(message.replace("{tmp}", str(tmp_path)))
    with pytest.raises((ValueError, OSError)):
        _cli.run(main, argv + ["--debug"])


def test_a_bug_still_shows_its_traceback():
    def buggy(argv):
        raise TypeError("a bug, not a user error")

    with pytest.raises(TypeError):
        _cli.run(buggy, [])
