"""Configs: every key checked by name (closest valid key suggested), every value by type and
range, numeric strings converted, the shipped configs valid, and what a resume may change."""
import glob
import pathlib
from types import SimpleNamespace

import pytest
import torch

from gumbel_kernels import train as train_cli
from gumbel_kernels.engine import config as config_module
from gumbel_kernels.engine.config import (DEFAULTS, KEY_RULES, ConfigError, known_keys,
                                          load_config, resume_conflicts)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "configs" / "*.yaml"))))
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert set(DEFAULTS) <= set(cfg)


def test_rules_without_a_default_are_only_loss_arguments_and_metadata():
    # A rule for a key that DEFAULTS lacks makes that key valid: only the loss arguments (not
    # defaulted here, the losses have their own defaults) and the metadata may be such keys;
    # a stale rule for a key renamed in DEFAULTS would fail this.
    flat = config_module._flatten(DEFAULTS)
    extra = {k for k in KEY_RULES if k not in flat}
    assert all(k.startswith("method.") or k in ("name", "description") for k in extra), extra


def test_a_key_added_to_defaults_is_known_with_its_type(monkeypatch, tmp_path):
    defaults = {**DEFAULTS, "solver": {**DEFAULTS["solver"], "new_knob": 0.5}}
    monkeypatch.setattr(config_module, "DEFAULTS", defaults)
    assert "solver.new_knob" in known_keys()
    path = write(tmp_path, "solver:\n  new_knob: 2e-1\n")
    assert load_config(path)["solver"]["new_knob"] == pytest.approx(0.2)
    with pytest.raises(ConfigError, match=r"solver.new_knob='x' must be a number"):
        load_config(path, {"solver.new_knob": "x"})


@pytest.mark.parametrize("text, message", [
    ("solver:\n  checkpoint_evry: 3\n",
     r"exp.yaml: unknown key solver.checkpoint_evry \(did you mean solver.checkpoint_every\?\)"),
    ("bas_lr: 0.1\n", r"unknown key bas_lr \(did you mean solver.base_lr\?\)"),
    ("solver:\n  bas_lr: 0.1\n", r"unknown key solver.bas_lr \(did you mean solver.base_lr\?\)"),
    ("modle:\n  nms: 0.3\n", r"unknown key modle \(did you mean model\?\)"),
    ("data:\n  synthetic: {num_clases: 3}\n", r"data.synthetic=.*unknown key 'num_clases' "
                                              r"\(did you mean 'num_classes'\?\)"),
])
def test_unknown_keys_name_path_file_and_closest_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_unknown_key_in_a_base_file_names_the_base(tmp_path):
    write(tmp_path, "solver:\n  warmup_iter: 3\n", "base.yaml")
    path = write(tmp_path, "_base_: base.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"base.yaml: unknown key solver.warmup_iter "
                                          r"\(did you mean solver.warmup_iters\?\)"):
        load_config(path)


def test_numeric_strings_from_yaml_are_converted(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 and 2e-2 as strings.
    cfg = load_config(write(tmp_path, "solver:\n  base_lr: 2e-2\n  weight_decay: 1e-4\n"
                                      "  max_iters: 1e4\nmethod:\n  lambda_: 1.1e-3\n"))
    assert cfg["solver"]["base_lr"] == 0.02 and isinstance(cfg["solver"]["base_lr"], float)
    assert cfg["solver"]["weight_decay"] == pytest.approx(1e-4)
    assert cfg["solver"]["max_iters"] == 10000 and isinstance(cfg["solver"]["max_iters"], int)
    assert cfg["method"]["lambda_"] == pytest.approx(0.0011)


@pytest.mark.parametrize("key, value, message", [
    ("solver.batch_size", 0, r"solver.batch_size=0 must be an integer >= 1"),
    ("solver.batch_size", -2, r"solver.batch_size=-2 must be an integer >= 1"),
    ("solver.batch_size", "abc", r"solver.batch_size='abc' must be an integer >= 1"),
    ("solver.batch_size", 2.5, r"must be an integer"),
    ("solver.batch_size", True, r"not a boolean"),
    ("solver.base_lr", -0.01, r"solver.base_lr=-0.01 must be a number > 0"),
    ("solver.base_lr", "fast", r"solver.base_lr='fast' must be a number"),
    ("solver.base_lr", float("nan"), r"finite"),
    ("method.lambda_", "abc", r"method.lambda_='abc' must be a number"),
    ("data.sampler", "rsf", r"data.sampler='rsf' must be one of 'random', 'rfs' "
                            r"\(did you mean 'rfs'\?\)"),
    ("data.rfs_mode", "ceil", r"data.rfs_mode='ceil' must be one of"),
    ("solver.schedule", "3x", r"solver.schedule='3x' must be one of '1x', '2x'"),
    ("model.norm", "gn", r"model.norm='gn' must be null or one of 'frozen_bn', 'eval_bn', 'bn'"),
    ("model.backbone", "resnet51", r"did you mean 'resnet50'"),
    ("method.loss", "gool", r"method.loss='gool' must be one of .*did you mean 'gol'"),
    ("model.min_size", [64, 0], r"model.min_size=\[64, 0\] must be"),
    ("model.rpn_pre_nms_top_n", [100], r"must be a list of 2 items"),
    ("model.nms", 1.5, r"model.nms=1.5 must be a number >= 0 and <= 1"),
    ("data.flip_prob", -0.1, r"must be a number >= 0 and <= 1"),
    ("data.num_workers", -1, r"must be an integer >= 0"),
    ("solver.max_iters", -1, r"solver.max_iters=-1 must be null or an integer >= 0"),
    ("solver.epochs", 0, r"solver.epochs=0 must be null or an integer >= 1"),
    ("solver.amp", "yes please", r"solver.amp='yes please' must be true or false"),
    ("method.clamp", [1, "x"], r"method.clamp=\[1, 'x'\] item 1"),
    ("eval.max_dets", 0, r"eval.max_dets=0 must be an integer >= 1"),
])
def test_bad_values_name_the_field(tmp_path, key, value, message):
    path = write(tmp_path, "seed: 0\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, {key: value}, {key: "--set"})


def test_command_line_errors_name_the_flag(tmp_path):
    path = write(tmp_path, "seed: 0\n")
    argv = ["--config", path, "--set", "solver=3"]
    with pytest.raises(ConfigError, match=r"--set solver=3: solver must be a section"):
        train_cli.main(argv)
    with pytest.raises(ConfigError, match=r"--set method.lambda_=abc: method.lambda_='abc'"):
        train_cli.main(["--config", path, "--set", "method.lambda_=abc"])
    with pytest.raises(ConfigError, match=r"--set solver.checkpoint_evry=5: unknown key "
                                          r"solver.checkpoint_evry \(did you mean"):
        train_cli.main(["--config", path, "--set", "solver.checkpoint_evry=5"])
    with pytest.raises(ConfigError, match=r"cannot set solver.base_lr.x: solver.base_lr is a value"):
        train_cli.main(["--config", path, "--set", "solver.base_lr.x=1"])
    with pytest.raises(ConfigError, match=r"--set 'solver.base_lr': expected KEY=VALUE"):
        train_cli.main(["--config", path, "--set", "solver.base_lr"])
    with pytest.raises(ConfigError, match=r"--max-iters: solver.max_iters=-3"):
        train_cli.main(["--config", path, "--max-iters", "-3"])
    with pytest.raises(ConfigError, match=r"--method gool: method.loss='gool'"):
        train_cli.main(["--config", path, "--method", "gool"])


def test_section_replaced_by_a_value_in_a_file(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml: solver must be a section"):
        load_config(write(tmp_path, "solver: 3\n"))
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(write(tmp_path, "solver: [\n"))
    with pytest.raises(ConfigError, match=r"_base_` must be a file name"):
        load_config(write(tmp_path, "_base_: 3\n"))


def test_resume_conflicts_list_only_what_may_not_change():
    saved = load_config(str(ROOT / "configs" / "demo_cpu.yaml"))
    current = load_config(str(ROOT / "configs" / "demo_cpu.yaml"),
                          {"solver.max_iters": 500, "solver.checkpoint_every": 7,
                           "eval.max_dets": 10, "data.num_workers": 2, "output_dir": "elsewhere"})
    assert resume_conflicts(saved, current) == []
    changed = load_config(str(ROOT / "configs" / "demo_cpu.yaml"),
                          {"solver.base_lr": 0.01, "model.nms": 0.5, "method.loss": "droploss"})
    assert resume_conflicts(saved, changed) == [
        "method.loss: checkpoint 'gol', now 'droploss'", "model.nms: checkpoint 0.3, now 0.5",
        "solver.base_lr: checkpoint 0.02, now 0.01"]
    # A key added to DEFAULTS after the checkpoint was written counts with its default.
    older = {k: v for k, v in saved.items()}
    older["data"] = {k: v for k, v in saved["data"].items() if k != "check_images"}
    assert resume_conflicts(older, current) == []


def test_a_loss_argument_the_loss_does_not_take_is_named(tmp_path):
    train_set = SimpleNamespace(image_counts=torch.tensor([1, 5, 40]), num_images=50,
                                num_images_with_annotations=50)
    path = write(tmp_path, "method:\n  loss: gol\n  num_sampled: 5\n")
    with pytest.raises(ConfigError, match=r"method.num_sampled: the loss 'gol' takes no such "
                                          r"argument"):
        train_cli.build_loss(load_config(path), train_set)
    federated = load_config(path, {"method.loss": "federated"})
    assert train_cli.build_loss(federated, train_set).num_sampled == 5
