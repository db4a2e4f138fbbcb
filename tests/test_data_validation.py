"""Start-up data checks: an empty training set, train/val category sets, the fields LVIS
evaluation needs, every image's existence and size (header reads), invalid RLEs, and the CIFAR
loader's --data-root; each error names the file and the record."""
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from gumbel_kernels import train as train_cli
from gumbel_kernels.classification import train_lt
from gumbel_kernels.data import LVISDataset
from gumbel_kernels.data import validation as checks
from gumbel_kernels.data.synthetic import generate

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A generated set: 4 classes, 8 train and 3 val images of 64 x 64."""
    return generate(tmp_path_factory.mktemp("small"), num_classes=4, train_images=8,
                    val_images=3, image_size=64, seed=1)


def edited(small, tmp_path, split, edit):
    """A copy of the set's `split` json with edit(data) applied; the images stay shared."""
    with open(small[split]) as f:
        data = json.load(f)
    edit(data)
    path = tmp_path / f"{split}_edited.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_the_generated_set_passes_every_check(small):
    train, val = LVISDataset(small["train"], small["images"]), LVISDataset(small["val"], small["images"])
    checks.check_has_annotations(train)
    checks.check_same_categories(train, val)
    checks.check_evaluation_fields(val)
    entries = checks.dataset_image_entries(train)
    assert len(entries) == 8 and entries[0].width == entries[0].height == 64
    checks.check_image_files(entries, small["train"], progress=False)


def test_a_training_json_without_annotations_is_refused(small, tmp_path):
    path = edited(small, tmp_path, "train", lambda d: d.update(annotations=[]))
    with pytest.raises(ValueError, match=r"train_edited.json: the training set has no annotations"):
        checks.check_has_annotations(LVISDataset(path, small["images"]))


def test_train_and_val_categories_must_be_equal(small, tmp_path):
    def drop_last_category(data):
        last = data["categories"].pop()["id"]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] != last]
        for image in data["images"]:
            for key in ("neg_category_ids", "not_exhaustive_category_ids"):
                image[key] = [c for c in image[key] if c != last]

    val = LVISDataset(edited(small, tmp_path, "val", drop_last_category), small["images"])
    train = LVISDataset(small["train"], small["images"])
    with pytest.raises(ValueError, match=r"train json .*train.json has 4 categories and the val "
                                         r"json .*val_edited.json 3.*only in train \[4\], only in "
                                         r"val \[\]"):
        checks.check_same_categories(train, val)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["categories"][1].pop("frequency"),
     r"val_edited.json: 1 of 4 categories lack a field LVIS evaluation needs.*categories\[id=2\] "
     r"has no 'frequency'"),
    (lambda d: [im.pop("neg_category_ids") for im in d["images"]],
     r"val_edited.json: 3 of 3 images have no 'neg_category_ids'.*images\[id=9\]"),
    (lambda d: d["images"][2].pop("not_exhaustive_category_ids"),
     r"1 of 3 images have no 'not_exhaustive_category_ids'.*images\[id=11\]"),
])
def test_evaluation_fields_are_checked(small, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        checks.check_evaluation_fields(LVISDataset(edited(small, tmp_path, "val", edit),
                                                   small["images"]))


def test_missing_wrong_size_and_unreadable_images(small, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(small["images"], images)
    dataset = LVISDataset(small["train"], images)
    names = sorted(os.listdir(images))
    os.remove(images / names[0])
    with pytest.raises(FileNotFoundError, match=r"train.json: image id 1 not found; tried .*; "
                                                r"1 of 8 images of this file are missing"):
        checks.dataset_image_entries(dataset)
    Image.new("RGB", (64, 64)).save(images / names[0])
    Image.new("RGB", (48, 64)).save(images / names[1])  # width 48, height 64
    (images / names[2]).write_bytes(b"not a png at all")
    entries = checks.dataset_image_entries(dataset)
    with pytest.raises(ValueError) as error:
        checks.check_image_files(entries, small["train"], progress=False, threads=2)
    message = str(error.value)
    assert message.startswith(f"{small['train']}: 2 of 8 images fail the check: ")
    assert f"image id 2: {images / names[1]} is 48x64 (width x height) but the json says 64x64" \
        in message
    assert f"image id 3: {images / names[2]} is not a readable image" in message


def test_image_check_reads_headers_only(tmp_path, monkeypatch):
    # A header read: PIL's lazy open, no pixel decoding.
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    checks.check_image_files([checks.ImageEntry(5, str(path), 300, 200)], "x.json", progress=False)
    assert decoded == []


def _runs(mask: np.ndarray) -> list:
    """Run lengths of a binary mask in column-major order, starting with zeros (COCO RLE)."""
    flat = np.asfortranarray(mask).reshape(-1, order="F")
    counts, current, length = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(length)
            current, length = value, 0
        length += 1
    counts.append(length)
    return counts


def test_compressed_rle_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(20):
        h, w = rng.integers(1, 40, size=2)
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if trial % 3 == 0:
            mask[:] = trial % 2
        rle = mask_utils.encode(np.asfortranarray(mask))
        text = rle["counts"].decode("ascii")
        assert checks._compressed_counts(text) == _runs(mask)
        assert checks.rle_problem({"size": [int(h), int(w)], "counts": text}) is None
        assert checks.rle_problem({"size": [int(h), int(w)], "counts": _runs(mask)}) is None


@pytest.mark.parametrize("counts, problem", [
    ("!!!", r"not a valid compressed RLE string \(it has the character '!' at 0\)"),
    ("0a", r"ends inside a run length"),
    ([5, 3], r"adding up to 8 pixels, not height x width = 4 x 5 = 20"),
    ([5, -3, 18], r"negative run length"),
    ([5.5, 14.5], r"must be a list of integers"),
])
def test_invalid_rle_names_the_annotation(small, tmp_path, counts, problem):
    def bad_rle(data):
        image = data["images"][0]
        data["images"][0].update(height=4, width=5)
        target = next(k for k, a in enumerate(data["annotations"]) if a["image_id"] == image["id"])
        data["annotations"][target]["segmentation"] = {"size": [4, 5], "counts": counts}
        data["annotations"][target]["bbox"] = [0, 0, 2, 2]

    path = edited(small, tmp_path, "train", bad_rle)
    with pytest.raises(ValueError, match=r"train_edited.json: annotations\[0\].segmentation.counts .*"
                                         + problem):
        LVISDataset(path, small["images"])


def test_the_trainer_checks_the_data_before_building_a_model(small, tmp_path, monkeypatch):
    root = pathlib.Path(small["root"])
    config = tmp_path / "cfg.yaml"
    config.write_text(f"""
_base_: {ROOT / 'configs' / 'demo_cpu.yaml'}
data:
  root: {root}
  synthetic: null
  train_json: train.json
  val_json: {edited(small, tmp_path, 'val', lambda d: d['categories'][0].pop('frequency'))}
  train_images: images
  val_images: images
""")
    monkeypatch.setattr(train_cli, "build_model", lambda *a, **k: pytest.fail("model built"))
    argv = ["--config", str(config), "--out", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(ValueError, match=r"categories\[id=1\] has no 'frequency'"):
        train_cli.main(argv)
    # Without evaluation the val fields do not matter; an image of the wrong size still does.
    images = tmp_path / "images"
    shutil.copytree(root / "images", images)
    Image.new("RGB", (10, 10)).save(images / sorted(os.listdir(images))[0])
    with pytest.raises(ValueError, match=r"1 of 8 images fail the check: image id 1: .* is 10x10"):
        train_cli.main(argv + ["--no-eval", "--set", f"data.train_images={images}"])


def test_cifar_data_root_without_a_copy_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data-root .*wrong: no CIFAR-100 copy"):
        train_lt.main(["--data-root", str(tmp_path / "wrong"), "--out", str(tmp_path / "out")])
