"""Data side of the harness: synthetic LVIS generator, LVISDataset, RFS sampler, transforms."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from gumbel_kernels.data import (LVISDataset, RepeatFactorSampler, ResizeConfig, build_train_sampler,
                                 build_transforms, collate_fn, repeat_factors)
from gumbel_kernels.data.synthetic import MAX_CLASSES, class_style, generate
from gumbel_kernels.data.transforms import Compose, RandomHorizontalFlip, ResizeShorterSide


# pycocotools' own mask decoding warns under NumPy 2; nothing to fix on our side.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The default synthetic data set (200 train / 50 val images, 30 classes)."""
    return generate(tmp_path_factory.mktemp("synth"), seed=0)


def _load(path):
    with open(path) as f:
        return json.load(f)


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


# ----------------------------------------------------------------------------- synthetic data
def test_synthetic_files_and_frequencies(synth):
    train, val = _load(synth["train"]), _load(synth["val"])
    assert len(train["images"]) == 200 and len(val["images"]) == 50
    cats = train["categories"]
    assert [c["id"] for c in cats] == list(range(1, 31))
    assert {c["frequency"] for c in cats} == {"r", "c", "f"}
    assert val["categories"] == cats  # val carries the train statistics, as LVIS does

    # image_count / instance_count / frequency are those of the generated train split
    images_of, instances_of = {}, {}
    for ann in train["annotations"]:
        images_of.setdefault(ann["category_id"], set()).add(ann["image_id"])
        instances_of[ann["category_id"]] = instances_of.get(ann["category_id"], 0) + 1
    for c in cats:
        n = len(images_of.get(c["id"], ()))
        assert c["image_count"] == n and c["instance_count"] == instances_of.get(c["id"], 0)
        assert c["frequency"] == ("r" if n <= 10 else "c" if n <= 100 else "f")

    # every val class occurs in val; 1-4 objects per image; images exist with the right size
    assert {a["category_id"] for a in val["annotations"]} == {c["id"] for c in cats}
    for split in (train, val):
        per_image = {}
        for ann in split["annotations"]:
            per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
            assert len(ann["bbox"]) == 4 and ann["area"] > 0
            assert isinstance(ann["segmentation"], list) and len(ann["segmentation"][0]) >= 6
        present = {}
        for ann in split["annotations"]:
            present.setdefault(ann["image_id"], set()).add(ann["category_id"])
        for img in split["images"]:
            assert 1 <= per_image[img["id"]] <= 4
            name = img["coco_url"].rsplit("/", 1)[-1]
            with Image.open(os.path.join(synth["images"], name)) as im:
                assert im.size == (img["width"], img["height"]) == (256, 256)
            assert not set(img["neg_category_ids"]) & present[img["id"]]
            assert set(img["not_exhaustive_category_ids"]) <= present[img["id"]]
    assert {i["id"] for i in train["images"]}.isdisjoint(i["id"] for i in val["images"])


def test_synthetic_is_deterministic(tmp_path):
    kw = dict(num_classes=6, train_images=12, val_images=3, image_size=64)
    a, b, c = (generate(tmp_path / d, seed=s, **kw) for d, s in (("a", 3), ("b", 3), ("c", 4)))
    assert _load(a["train"]) == _load(b["train"]) and _load(a["val"]) == _load(b["val"])
    assert _load(a["train"]) != _load(c["train"])
    for name in os.listdir(a["images"]):
        with open(os.path.join(a["images"], name), "rb") as fa, \
                open(os.path.join(b["images"], name), "rb") as fb:
            assert fa.read() == fb.read()
    with pytest.raises(ValueError, match="val_images"):
        generate(tmp_path / "d", num_classes=9, train_images=10, val_images=2, image_size=64)


def test_class_styles_are_distinct():
    styles = [class_style(k) for k in range(MAX_CLASSES)]
    assert len(set(styles)) == MAX_CLASSES


def test_synthetic_cli(tmp_path):
    from gumbel_kernels.data.synthetic import main

    main(["--out", str(tmp_path), "--num-classes", "4", "--train-images", "6",
          "--val-images", "2", "--image-size", "64", "--seed", "1"])
    assert len(_load(tmp_path / "train.json")["images"]) == 6
    assert len(os.listdir(tmp_path / "images")) == 8


# ----------------------------------------------------------------------------- LVISDataset
def test_dataset_v1(synth):
    raw = _load(synth["train"])
    ds = LVISDataset(synth["train"], synth["images"])
    assert len(ds) == ds.num_images == 200 and ds.num_classes == 30
    assert ds.cat_ids == sorted(c["id"] for c in raw["categories"])
    assert ds.image_counts.dtype == torch.int64
    assert ds.image_counts.tolist() == [c["image_count"] for c in ds.categories]
    assert ds.frequencies == [c["frequency"] for c in ds.categories]
    assert ds.image_ids == sorted(i["id"] for i in raw["images"])

    image, target = ds[3]
    assert image.dtype == torch.float32 and image.shape == (3, 256, 256)
    assert 0.0 <= image.min() and image.max() <= 1.0
    anns = [a for a in raw["annotations"] if a["image_id"] == ds.image_ids[3]]
    assert target["image_id"] == ds.image_ids[3]
    assert target["orig_size"].tolist() == [256, 256] and target["orig_size"].dtype == torch.int64
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (len(anns), 256, 256)
    for k, ann in enumerate(anns):
        x, y, w, h = ann["bbox"]
        torch.testing.assert_close(target["boxes"][k], torch.tensor([x, y, x + w, y + h]))
        assert ds.cat_ids[target["labels"][k]] == ann["category_id"]
        assert abs(int(target["masks"][k].sum()) - ann["area"]) <= 1
    assert ds.image_class_indices(3) == set(target["labels"].tolist())

    # the image really shows the object: mean colour inside a mask is the class colour
    from gumbel_kernels.data.synthetic import COLOURS
    k = 0
    colour = COLOURS[class_style(int(target["labels"][k]))[1]]
    inside = image[:, target["masks"][k].bool()].mean(dim=1) * 255
    assert torch.allclose(inside, torch.tensor(colour, dtype=torch.float32), atol=20)


def _tiny_image(root, name, h=20, w=30, value=0):
    os.makedirs(root, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(os.path.join(root, name))


def _v05_file(tmp_path):
    """A hand-made v0.5-style file: file_name, no image_count / frequency, unsorted category ids,
    polygon, compressed and uncompressed RLE masks, one zero-area box."""
    root = tmp_path / "imgs"
    _tiny_image(root, "COCO_val2014_000000000007.jpg".replace(".jpg", ".png"))
    _tiny_image(root, "000000000003.png")  # 2017 name of COCO_val2014_000000000003.png
    square = np.zeros((20, 30), np.uint8)
    square[2:6, 3:9] = 1  # rows 2..5, cols 3..8
    compressed = mask_utils.encode(np.asfortranarray(square))
    compressed["counts"] = compressed["counts"].decode("ascii")
    # uncompressed RLE (column-major runs): 10 zeros then 5 ones -> column 0, rows 10..14
    uncompressed = {"size": [20, 30], "counts": [10, 5, 600 - 15]}
    data = {
        "images": [
            {"id": 7, "height": 20, "width": 30, "file_name": "COCO_val2014_000000000007.png"},
            {"id": 3, "height": 20, "width": 30, "file_name": "COCO_val2014_000000000003.png"},
        ],
        "categories": [{"id": 9, "name": "z"}, {"id": 2, "name": "a"}, {"id": 5, "name": "m"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "bbox": [3, 2, 6, 4], "segmentation": compressed},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 10, 1, 5], "segmentation": uncompressed},
            {"id": 3, "image_id": 7, "category_id": 5, "bbox": [10, 10, 0, 4],
             "segmentation": [[10, 10, 10, 14, 10, 12]]},  # zero-area box: dropped
            {"id": 4, "image_id": 3, "category_id": 5, "bbox": [10, 4, 10, 8],
             "segmentation": [[10, 4, 20, 4, 20, 12, 10, 12]]},
        ],
    }
    return _write_json(tmp_path / "v05.json", data), str(root), square


def test_dataset_v05_file_name_rle_and_polygon(tmp_path):
    ann_file, root, square = _v05_file(tmp_path)
    ds = LVISDataset(ann_file, root)
    assert ds.cat_ids == [2, 5, 9] and ds.num_classes == 3
    assert ds.image_ids == [3, 7]  # sorted by id
    # counted from annotations (the zero-area annotation still names its class)
    assert ds.image_counts.tolist() == [1, 2, 1]
    assert ds.frequencies == ["r", "r", "r"]
    assert ds.image_class_indices(1) == {0, 1, 2}

    image, target = ds[1]  # image id 7
    assert image.shape == (3, 20, 30)
    assert target["labels"].tolist() == [2, 0]  # cat 9 -> 2, cat 2 -> 0; zero-area box dropped
    torch.testing.assert_close(target["boxes"], torch.tensor([[3., 2., 9., 6.], [0., 10., 1., 15.]]))
    assert torch.equal(target["masks"][0], torch.from_numpy(square))
    expected = torch.zeros(20, 30, dtype=torch.uint8)
    expected[10:15, 0] = 1
    assert torch.equal(target["masks"][1], expected)

    _, target = ds[0]  # polygon of an axis-aligned rectangle
    assert target["labels"].tolist() == [1]
    area = int(target["masks"][0].sum())
    assert abs(area - 10 * 8) <= 20  # pycocotools rasterises polygon borders half-in

    boxes_only = LVISDataset(ann_file, root, with_masks=False)
    assert "masks" not in boxes_only[1][1]


def test_dataset_coco_url_two_part_layout(tmp_path):
    """v1 coco_url '.../train2017/x.jpg' found as image_root/train2017/x.jpg (detectron2 layout)."""
    _tiny_image(tmp_path / "coco" / "train2017", "000000000042.png")
    data = {"images": [{"id": 42, "height": 20, "width": 30,
                        "coco_url": "http://images.cocodataset.org/train2017/000000000042.png"}],
            "categories": [{"id": 1, "image_count": 500, "frequency": "f"}],
            "annotations": []}
    ds = LVISDataset(_write_json(tmp_path / "v1.json", data), tmp_path / "coco")
    image, target = ds[0]
    assert image.shape == (3, 20, 30) and target["boxes"].shape == (0, 4)
    assert target["masks"].shape == (0, 20, 30)
    assert ds.image_counts.tolist() == [500] and ds.frequencies == ["f"]
    assert len(LVISDataset(tmp_path / "v1.json", tmp_path / "coco", filter_empty=True)) == 0


def _coco_root_with_lvis_v1_val(tmp_path):
    """A COCO root as LVIS v1 val uses it: two images from train2017/, one from val2017/."""
    root = tmp_path / "coco"
    images = []
    for image_id, folder in ((1, "train2017"), (2, "val2017"), (3, "train2017")):
        name = f"{image_id:012d}.png"
        _tiny_image(root / folder, name)
        images.append({"id": image_id, "height": 20, "width": 30,
                       "coco_url": f"http://images.cocodataset.org/{folder}/{name}"})
    data = {"images": images, "categories": [{"id": 1, "image_count": 2, "frequency": "r"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]}
    return _write_json(tmp_path / "lvis_v1_val.json", data), root


def test_lvis_v1_images_follow_coco_url_into_both_coco_folders(tmp_path):
    ann_file, root = _coco_root_with_lvis_v1_val(tmp_path)
    ds = LVISDataset(ann_file, root, with_masks=False)
    ds.check_image_files()
    assert [os.path.relpath(ds.image_path(i), root) for i in range(3)] == [
        os.path.join("train2017", "000000000001.png"), os.path.join("val2017", "000000000002.png"),
        os.path.join("train2017", "000000000003.png")]
    assert ds[2][0].shape == (3, 20, 30)


def test_a_missing_image_fails_at_the_check_naming_json_id_and_paths(tmp_path):
    ann_file, root = _coco_root_with_lvis_v1_val(tmp_path)
    os.remove(root / "train2017" / "000000000003.png")
    ds = LVISDataset(ann_file, root, with_masks=False)
    with pytest.raises(FileNotFoundError) as info:
        ds.check_image_files()
    message = str(info.value)
    assert "lvis_v1_val.json" in message and "image id 3 " in message, message
    for tried in (root / "train2017" / "000000000003.png", root / "000000000003.png"):
        assert str(tried) in message, message
    assert "1 of 3 images" in message
    # The old layout, image_root = root/val2017, misses the train2017 images.
    with pytest.raises(FileNotFoundError, match="2 of 3 images"):
        LVISDataset(ann_file, root / "val2017", with_masks=False).check_image_files()


def test_frequency_denominator_counts_images_with_annotations(tmp_path):
    ann_file, root = _coco_root_with_lvis_v1_val(tmp_path)
    ds = LVISDataset(ann_file, root)
    assert ds.num_images == 3 and ds.num_images_with_annotations == 1
    assert len(LVISDataset(ann_file, root, filter_empty=True)) == 1


def test_polygon_targets_flip_and_resize(tmp_path):
    from gumbel_kernels.data.transforms import flip_polygon_entry, resize_polygon_entry
    ann_file, root, square = _v05_file(tmp_path)
    ds = LVISDataset(ann_file, root, mask_format="polygon")
    image, target = ds[0]
    assert "masks" not in target and len(target["polygons"]) == 1
    np.testing.assert_array_equal(target["polygons"][0][0], [10, 4, 20, 4, 20, 12, 10, 12])
    _, mirrored = RandomHorizontalFlip(1.0)(image, target)
    np.testing.assert_array_equal(mirrored["polygons"][0][0], [20, 4, 10, 4, 10, 12, 20, 12])
    _, target = ds[1]  # RLE instances stay bitmaps
    assert torch.equal(target["polygons"][0], torch.from_numpy(square))
    flipped = flip_polygon_entry([np.array([10.0, 4, 20, 4, 20, 12])], 30)
    np.testing.assert_array_equal(flipped[0], [20, 4, 10, 4, 10, 12])
    assert torch.equal(flip_polygon_entry(torch.from_numpy(square), 30),
                       torch.from_numpy(square[:, ::-1].copy()))
    resized = resize_polygon_entry([np.array([10.0, 4, 20, 4, 20, 12])], (20, 30), (40, 45))
    np.testing.assert_allclose(resized[0], [15, 8, 30, 8, 30, 24])
    assert resize_polygon_entry(torch.from_numpy(square), (20, 30), (40, 60)).sum() == 4 * square.sum()
    with pytest.raises(ValueError, match="mask_format"):
        LVISDataset(ann_file, root, mask_format="rle")


@pytest.mark.parametrize("corrupt, field", [
    (lambda d: d.pop("annotations"), "'annotations'"),
    (lambda d: d["annotations"][1].update(category_id=999), "annotations[1].category_id=999"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotations[0].bbox"),
    (lambda d: d["annotations"][3].update(image_id=12345), "annotations[3].image_id=12345"),
    (lambda d: d["annotations"][2].pop("bbox"), "annotations[2].bbox"),
    (lambda d: d["images"][0].pop("file_name"), "images[0]"),
    (lambda d: d["images"][1].update(height="20"), "images[1].height"),
    (lambda d: d["categories"].append({"id": 2}), "categories[3].id"),
    (lambda d: d["categories"][0].update(frequency="x"), "categories[0].frequency"),
    (lambda d: d["annotations"][3].update(segmentation=[[1, 2, 3]]), "annotations[3].segmentation[0]"),
])
def test_malformed_files_name_file_and_field(tmp_path, corrupt, field):
    ann_file, root, _ = _v05_file(tmp_path)
    data = _load(ann_file)
    corrupt(data)
    bad = _write_json(tmp_path / "broken_ann.json", data)
    with pytest.raises(ValueError) as info:
        LVISDataset(bad, root)
    message = str(info.value)
    assert "broken_ann.json" in message and field in message, message


def test_not_json_is_value_error(tmp_path):
    path = tmp_path / "garbage.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="garbage.json"):
        LVISDataset(path, tmp_path)


def test_dataloader_with_collate(synth):
    ds = LVISDataset(synth["val"], synth["images"], build_transforms(train=True))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn,
                                         sampler=build_train_sampler(ds, "random"))
    images, targets = next(iter(loader))
    assert isinstance(images, tuple) and len(images) == 3 and len(targets) == 3
    assert all(t["boxes"].shape[0] == t["masks"].shape[0] == t["labels"].shape[0] for t in targets)


# ----------------------------------------------------------------------------- repeat factors
def test_repeat_factors_hand_computed():
    # 1000 images; t = 0.01. f = (0.001, 0.004, 1.0) -> r_c = (sqrt(10), sqrt(2.5), 1)
    class_sets = [{0}, {1}, {0, 1}, set(), {2}, {1, 2}]
    r = repeat_factors(class_sets, torch.tensor([1, 4, 1000]), 1000, threshold=0.01)
    expected = [math.sqrt(10), math.sqrt(2.5), math.sqrt(10), 1.0, 1.0, math.sqrt(2.5)]
    assert r.dtype == torch.float64
    assert r.tolist() == pytest.approx(expected, rel=1e-12)
    # GOL's rule on these: ceil -> 4, 2, 4, 1, 1, 2
    assert torch.ceil(r).to(torch.int64).tolist() == [4, 2, 4, 1, 1, 2]
    with pytest.raises(ValueError, match="class index 7"):
        repeat_factors([{7}], [1, 2], 10)


def test_repeat_factors_from_dataset(synth):
    ds = LVISDataset(synth["train"], synth["images"])
    t = 0.05
    r = repeat_factors(ds, ds.image_counts, ds.num_images, threshold=t)
    counts = ds.image_counts.double()
    for i in (0, 17, 123):
        classes = ds.image_class_indices(i)
        want = max([1.0] + [max(1.0, math.sqrt(t / (counts[c].item() / 200))) for c in classes])
        assert r[i].item() == pytest.approx(want)
    # on 200 images LVIS's t = 0.001 repeats nothing (every f_c >= 1/200 > t)
    assert torch.all(repeat_factors(ds, ds.image_counts, ds.num_images) == 1)
    sampler = build_train_sampler(ds, "rfs", threshold=t)
    assert len(sampler) == int(torch.ceil(r).sum()) > len(ds)
    assert len(build_train_sampler(ds, "random")) == len(ds)
    with pytest.raises(ValueError, match="kind"):
        build_train_sampler(ds, "balanced")


# ----------------------------------------------------------------------------- sampler
def test_deterministic_sampler_counts_and_order():
    factors = torch.tensor([1.0, 1.5, 3.2, 2.0, 1.0])
    s = RepeatFactorSampler(factors, mode="deterministic", shuffle=False, num_replicas=1, rank=0)
    assert list(s) == [0, 1, 1, 2, 2, 2, 2, 3, 3, 4] and len(s) == 10
    shuffled = RepeatFactorSampler(factors, seed=5, num_replicas=1, rank=0)
    first = list(shuffled)
    assert sorted(first) == list(s) and len(shuffled) == 10
    assert list(shuffled) == first  # same epoch, same order
    shuffled.set_epoch(1)
    second = list(shuffled)
    assert sorted(second) == list(s) and second != first


def test_stochastic_sampler_expectation():
    factors = torch.tensor([1.0, 1.25, 2.5, 3.9])
    s = RepeatFactorSampler(factors, mode="stochastic", seed=0, num_replicas=1, rank=0)
    totals = torch.zeros(4, dtype=torch.float64)
    epochs = 500
    lengths = set()
    for e in range(epochs):
        s.set_epoch(e)
        counts = torch.bincount(torch.tensor(list(s)), minlength=4)
        assert torch.all(counts >= torch.floor(factors).long())
        assert torch.all(counts <= torch.ceil(factors).long())
        assert len(s) == int(counts.sum())
        lengths.add(len(s))
        totals += counts
    mean = totals / epochs
    # binomial standard error <= 0.5 / sqrt(500) ~ 0.022 (and the seed is fixed)
    assert torch.allclose(mean, factors.double(), atol=0.07), mean
    assert len(lengths) > 1  # the epoch length varies
    with pytest.raises(ValueError, match="mode"):
        RepeatFactorSampler(factors, mode="sometimes")


@pytest.mark.parametrize("mode", ["deterministic", "stochastic"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_distributed_slices_disjoint_equal(mode, world):
    factors = torch.tensor([1.0, 2.0, 1.3, 3.0, 1.0, 1.7, 1.0])
    whole = RepeatFactorSampler(factors, mode=mode, seed=11, num_replicas=1, rank=0)
    whole.set_epoch(4)
    epoch_list = list(whole)
    parts = []
    for rank in range(world):
        s = RepeatFactorSampler(factors, mode=mode, seed=11, num_replicas=world, rank=rank)
        s.set_epoch(4)
        parts.append(list(s))
    per_rank = math.ceil(len(epoch_list) / world)
    assert all(len(p) == len(s_) == per_rank for p, s_ in zip(parts, parts))
    # position k of rank r is position k * world + r of the (wrap-padded) epoch list:
    # the ranks take disjoint positions that cover the whole epoch
    padded = (epoch_list * 2)[: per_rank * world]
    rebuilt = [parts[k % world][k // world] for k in range(per_rank * world)]
    assert rebuilt == padded


def test_distributed_random_mode_covers_dataset():
    world, n = 3, 10
    seen = []
    for rank in range(world):
        s = RepeatFactorSampler(torch.ones(n), seed=2, num_replicas=world, rank=rank)
        assert len(s) == 4
        seen.append(list(s))
    flat = sum(seen, [])
    assert set(flat) == set(range(n)) and len(flat) == 12  # 2 wrapped pads
    with pytest.raises(ValueError, match="rank"):
        RepeatFactorSampler(torch.ones(n), num_replicas=2, rank=2)


# ----------------------------------------------------------------------------- transforms
def _boxes_of(masks):
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return torch.tensor(out, dtype=torch.float32)


def _toy_pair():
    h, w = 40, 60
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 5:15, 3:20] = 1
    masks[1, 20:38, 40:58] = 1
    image = torch.rand(3, h, w)
    target = {"boxes": _boxes_of(masks), "masks": masks, "labels": torch.tensor([0, 1])}
    return image, target


def test_flip_keeps_boxes_and_masks_consistent():
    image, target = _toy_pair()
    flipped_image, flipped = RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(flipped_image, image.flip(-1))
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    torch.testing.assert_close(flipped["boxes"], _boxes_of(flipped["masks"]))
    torch.testing.assert_close(flipped["boxes"][0], torch.tensor([60 - 20., 5., 60 - 3., 15.]))
    assert torch.equal(target["boxes"], _boxes_of(target["masks"]))  # input not modified
    same_image, same = RandomHorizontalFlip(p=0.0)(image, target)
    assert same_image is image and same is target


def test_flip_probability_and_build_transforms():
    g = torch.Generator().manual_seed(0)
    flip = RandomHorizontalFlip(p=0.5, generator=g)
    image = torch.arange(6.0).reshape(1, 1, 6)
    flips = sum(bool(flip(image, None)[0][0, 0, 0] == 5) for _ in range(400))
    assert 150 < flips < 250
    assert isinstance(build_transforms(train=True), Compose)
    assert build_transforms(train=False) is None


def test_resize_shorter_side_consistent():
    image, target = _toy_pair()
    resized_image, resized = ResizeShorterSide((80,), max_size=1000)(image, target)
    assert resized_image.shape == (3, 80, 120)
    torch.testing.assert_close(resized["boxes"], target["boxes"] * 2)
    torch.testing.assert_close(resized["boxes"], _boxes_of(resized["masks"]))
    capped, _ = ResizeShorterSide((80,), max_size=90)(image, None)
    assert capped.shape == (3, 60, 90)


def test_resize_config():
    cfg = ResizeConfig()
    assert cfg.train_min_sizes == (640, 672, 704, 736, 768, 800) and cfg.max_size == 1333
    assert cfg.model_kwargs() == {"min_size": (640, 672, 704, 736, 768, 800), "max_size": 1333}
    demo = ResizeConfig.cpu_demo()
    assert demo.model_kwargs() == {"min_size": (256, 288, 320), "max_size": 512}
    with pytest.raises(ValueError, match="min_size\\[-1\\]"):
        ResizeConfig(train_min_sizes=(320, 256), test_min_size=320)
