"""The training CLI end to end on a tiny generated dataset: metrics, plots, exact resume (the
log cut back, a changed config refused), output folders of earlier runs, zero iterations,
weights_only checkpoints read by --eval-only and the analysis tools, a 2-process gloo DDP run
that logs on rank 0 only; and on the real LVIS v1 image layout (val images in both COCO
folders), whose image check fails before the model is built."""
import json
import os
import pathlib
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from gumbel_kernels import train as train_cli
from gumbel_kernels.analysis import __main__ as analysis_cli
from gumbel_kernels.engine.checkpoint import CheckpointError, load_checkpoint
from gumbel_kernels.engine.config import ConfigError, load_config
from gumbel_kernels.engine.trainer import load_resume_state

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    config = folder / "tiny.yaml"
    config.write_text(f"""
_base_: {ROOT / 'configs' / 'demo_cpu.yaml'}
model:
  min_size: [64]
  max_size: 80
  box_batch_size_per_image: 16
  rpn_pre_nms_top_n: [50, 30]
  rpn_post_nms_top_n: [30, 20]
  detections_per_img: 20
data:
  root: {folder / 'data'}
  synthetic: {{num_classes: 4, train_images: 8, val_images: 3, image_size: 64, seed: 1}}
  rfs_threshold: 0.5
method:
  loss: gol
  lambda_: 0.3
solver:
  epochs: 4
  warmup_iters: 2
  checkpoint_every: 0
eval:
  max_dets: 20
""")
    return config


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_demo_config_end_to_end(tiny_config, tmp_path, capsys):
    metrics = train_cli.main(["--config", str(tiny_config), "--out", str(tmp_path), "--max-iters",
                              "2", "--no-progress"])
    with open(tmp_path / "metrics.json") as f:
        written = json.load(f)
    for key in ("AP", "APr", "APc", "APf", "APb"):
        assert key in written and written[key] == metrics[key]
    results = json.load(open(tmp_path / "results.json"))
    assert results and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    assert len(losses(tmp_path)) == 2
    for name in ("loss_curve.png", "ap_by_frequency.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith(f"outputs in {tmp_path}/: checkpoint.pt, log.jsonl")
    assert "ap_by_frequency.png" in last_line

    # The checkpoint loads with weights_only=True, verified, in --eval-only and the analysis.
    checkpoint = tmp_path / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["iteration"] == 2
    again = train_cli.main(["--config", str(tiny_config), "--out", str(tmp_path / "eval"),
                            "--eval-only", "--checkpoint", str(checkpoint), "--no-progress"])
    assert again["AP"] == pytest.approx(metrics["AP"], abs=1e-9)
    summary = analysis_cli.main(["weight-norms", "--checkpoint", str(checkpoint), "--ann",
                                 str(tiny_config.parent / "data" / "train.json"),
                                 "--out", str(tmp_path / "norms")])
    assert set(summary["checkpoint"]) == {"rare", "common", "frequent"}

    # A new run into this folder stops before touching it; --overwrite starts anew (and
    # --max-iters 0 trains nothing: an empty log, a checkpoint at iteration 0).
    common = ["--config", str(tiny_config), "--out", str(tmp_path), "--no-progress", "--no-eval"]
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(checkpoint.pt, log.jsonl"
                                              r".*--resume continues it, --overwrite deletes"):
        train_cli.main(common)
    assert len(losses(tmp_path)) == 2
    train_cli.main(common + ["--overwrite", "--max-iters", "0"])
    assert losses(tmp_path) == []
    assert load_checkpoint(str(checkpoint))["iteration"] == 0
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "results.json").exists()


def _lvis_v1_coco_root(root):
    """A COCO root in the real LVIS v1 layout: annotations/lvis_v1_{train,val}.json, train
    images in train2017/, val images in *both* train2017/ and val2017/ (as LVIS v1 val)."""
    splits = {"train": [(1, "train2017"), (2, "train2017")],
              "val": [(3, "train2017"), (4, "val2017"), (5, "train2017")]}
    os.makedirs(root / "annotations")
    for split, images in splits.items():
        records, annotations = [], []
        for image_id, folder in images:
            name = f"{image_id:012d}.png"
            os.makedirs(root / folder, exist_ok=True)
            pixels = np.zeros((64, 64, 3), np.uint8)
            pixels[16:48, 8:40] = (200, 40, 40)
            Image.fromarray(pixels).save(root / folder / name)
            records.append({"id": image_id, "height": 64, "width": 64,
                            "coco_url": f"http://images.cocodataset.org/{folder}/{name}",
                            "neg_category_ids": [], "not_exhaustive_category_ids": []})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": 1,
                                "bbox": [8, 16, 32, 32], "area": 1024,
                                "segmentation": [[8, 16, 40, 16, 40, 48, 8, 48]]})
        data = {"images": records, "annotations": annotations,
                "categories": [{"id": 1, "name": "box", "image_count": 2, "frequency": "r"},
                               {"id": 2, "name": "none", "image_count": 0, "frequency": "r"}]}
        with open(root / "annotations" / f"lvis_v1_{split}.json", "w") as f:
            json.dump(data, f)


@pytest.fixture()
def lvis_layout_config(tiny_config, tmp_path):
    """The tiny config on the LVIS layout, with the official recipe's model switches."""
    root = tmp_path / "coco"
    _lvis_v1_coco_root(root)
    config = tmp_path / "layout.yaml"
    config.write_text(f"""
_base_: {tiny_config}
model:
  roi_sampling_ratio: 0
  roi_aligned: true
  box_loss: l1
  mask_target: polygon
  mask_paste: grid_sample
data:
  root: {root}
  synthetic: null
  train_json: annotations/lvis_v1_train.json
  val_json: annotations/lvis_v1_val.json
  train_images: .
  val_images: .
""")
    return config, root


def test_real_lvis_v1_layout_trains_and_evaluates(lvis_layout_config, tmp_path):
    config, _ = lvis_layout_config
    metrics = train_cli.main(["--config", str(config), "--out", str(tmp_path / "run"),
                              "--max-iters", "1", "--no-progress"])
    assert set(metrics) >= {"AP", "APb"}
    results = json.load(open(tmp_path / "run" / "results.json"))
    assert {r["image_id"] for r in results} <= {3, 4, 5}


def test_a_missing_val_image_fails_before_the_model_is_built(lvis_layout_config, monkeypatch):
    config, root = lvis_layout_config
    os.remove(root / "train2017" / "000000000005.png")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the image check")

    monkeypatch.setattr(train_cli, "build_model", no_model)
    with pytest.raises(FileNotFoundError) as info:
        train_cli.main(["--config", str(config), "--out", str(root / "run"), "--no-progress"])
    message = str(info.value)
    assert "lvis_v1_val.json" in message and "image id 5 " in message
    assert str(root / "train2017" / "000000000005.png") in message


def test_resume_gives_the_same_next_step(tiny_config, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    common = ["--config", str(tiny_config), "--no-progress", "--no-eval"]
    train_cli.main(common + ["--out", str(straight), "--max-iters", "5"])
    train_cli.main(common + ["--out", str(interrupted), "--max-iters", "3"])
    # As if the run had gone on past its last checkpoint and was killed mid-line.
    with open(interrupted / "log.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 4, "loss": 99.0}) + "\n" + '{"iteration": 5, "lo')
    # What a resume may not change is refused, naming the keys, before anything is loaded.
    with pytest.raises(ConfigError, match=r"cannot change: method.lambda_: checkpoint 0.3, now "
                                          r"0.2; solver.base_lr: checkpoint 0.02, now 0.01"):
        train_cli.main(common + ["--out", str(interrupted), "--resume", "--set",
                                 "solver.base_lr=0.01", "method.lambda_=0.2"])
    # A checkpoint of an older version (pickled NumPy RNG state, no checksum) needs the opt-in.
    legacy = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    legacy.pop("_integrity")
    legacy["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(),
                     "torch": torch.get_rng_state()}
    (tmp_path / "legacy").mkdir()
    torch.save(legacy, tmp_path / "legacy" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"holds pickled Python objects.*--allow-pickle"):
        train_cli.main(common + ["--out", str(tmp_path / "legacy"), "--resume"])
    cfg = load_config(str(tiny_config), {"output_dir": str(tmp_path / "legacy")})
    assert load_resume_state(str(tmp_path / "legacy" / "checkpoint.pt"), cfg,
                             allow_pickle=True)["iteration"] == 3
    train_cli.main(common + ["--out", str(interrupted), "--max-iters", "5", "--resume"])
    a, b = losses(straight), losses(interrupted)
    assert len(a) == len(b) == 5
    with open(interrupted / "log.jsonl") as f:
        assert [json.loads(line)["iteration"] for line in f] == [1, 2, 3, 4, 5]
    assert b[3:] == pytest.approx(a[3:], rel=1e-6, abs=1e-7)


def free_port():
    # Other test runs on the same machine may hold a fixed port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp(tiny_config, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", "-m", "gumbel_kernels.train",
               "--config", str(tiny_config), "--out", str(tmp_path), "--max-iters", "2",
               "--device", "cpu", "--no-progress"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert len(losses(tmp_path)) == 2
    assert "[rank 0]" in result.stderr and "[rank 1]" not in result.stderr  # rank 0 logs only
    assert json.load(open(tmp_path / "metrics.json"))["APb"] >= 0
