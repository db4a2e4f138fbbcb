"""The training CLI end to end on a tiny generated dataset: metrics, exact resume, atomic
checkpoints and a 2-process gloo DDP run."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from gumbel_kernels import train as train_cli
from gumbel_kernels.engine.checkpoint import save_checkpoint

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


def test_demo_config_end_to_end(tiny_config, tmp_path):
    metrics = train_cli.main(["--config", str(tiny_config), "--out", str(tmp_path), "--max-iters",
                              "2", "--no-progress"])
    with open(tmp_path / "metrics.json") as f:
        written = json.load(f)
    for key in ("AP", "APr", "APc", "APf", "APb"):
        assert key in written and written[key] == metrics[key]
    results = json.load(open(tmp_path / "results.json"))
    assert results and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    assert len(losses(tmp_path)) == 2
    assert (tmp_path / "checkpoint.pt").exists()


def test_resume_gives_the_same_next_step(tiny_config, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    common = ["--config", str(tiny_config), "--no-progress", "--no-eval"]
    train_cli.main(common + ["--out", str(straight), "--max-iters", "5"])
    train_cli.main(common + ["--out", str(interrupted), "--max-iters", "3"])
    train_cli.main(common + ["--out", str(interrupted), "--max-iters", "5", "--resume"])
    a, b = losses(straight), losses(interrupted)
    assert len(a) == len(b) == 5
    assert b[3:] == pytest.approx(a[3:], rel=1e-6, abs=1e-7)


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(str(path), {"step": 2, "bad": Unpicklable()})
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_two_process_gloo_ddp(tiny_config, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port=29533", "-m", "gumbel_kernels.train", "--config", str(tiny_config),
               "--out", str(tmp_path), "--max-iters", "2", "--device", "cpu", "--no-progress"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(losses(tmp_path)) == 2
    assert json.load(open(tmp_path / "metrics.json"))["APb"] >= 0
