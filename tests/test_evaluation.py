"""LVIS evaluation: results conversion, faster-coco-eval metrics, agreement with the LVIS API."""
import copy
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from gumbel_kernels.data import LVISDataset
from gumbel_kernels.data.synthetic import generate
from gumbel_kernels.evaluation import (detections_to_lvis_results, evaluate_lvis,
                                       format_metrics_table, limit_dets_per_image)


# pycocotools' own mask decoding warns under NumPy 2; nothing to fix on our side.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    paths = generate(tmp_path_factory.mktemp("synth"), seed=1)
    ds = LVISDataset(paths["val"], paths["images"])
    return paths, ds


def _perfect_outputs(ds):
    outputs, image_ids = [], []
    for i in range(len(ds)):
        t = ds.get_target(i)
        k = len(t["labels"])
        outputs.append({"boxes": t["boxes"], "scores": torch.ones(k), "labels": t["labels"],
                        "masks": t["masks"][:, None].float()})
        image_ids.append(t["image_id"])
    return outputs, image_ids


def _noisy_outputs(ds, seed=0):
    """Jittered, relabelled, shifted and spurious detections, with one image over 300."""
    rng = np.random.default_rng(seed)
    outputs, image_ids = [], []
    for i in range(len(ds)):
        t = ds.get_target(i)
        h, w = t["orig_size"].tolist()
        boxes, scores, labels, masks = [], [], [], []
        for box, label, mask in zip(t["boxes"], t["labels"], t["masks"]):
            for _ in range(3):
                size = (box[2:] - box[:2]).repeat(2)
                jitter = torch.from_numpy(rng.normal(0, 0.1, 4)).float() * size
                b = box + jitter
                b[2:] = torch.maximum(b[2:], b[:2] + 1)
                boxes.append(b)
                scores.append(float(rng.random()))
                labels.append(int(label) if rng.random() < 0.7 else int(rng.integers(ds.num_classes)))
                dy, dx = rng.integers(-4, 5, size=2)
                masks.append(torch.roll(mask, shifts=(int(dy), int(dx)), dims=(0, 1)).float()
                             * float(rng.uniform(0.55, 1.0)))
        n_spurious = 320 if i == 0 else int(rng.integers(0, 6))
        for _ in range(n_spurious):  # random boxes of random classes
            x1, y1 = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
            bw, bh = rng.uniform(5, 60, size=2)
            b = torch.tensor([x1, y1, min(x1 + bw, w), min(y1 + bh, h)], dtype=torch.float32)
            boxes.append(b)
            scores.append(float(rng.random()) * 0.5)
            labels.append(int(rng.integers(ds.num_classes)))
            m = torch.zeros(h, w)
            m[int(b[1]):int(b[3]), int(b[0]):int(b[2])] = 0.9
            masks.append(m)
        outputs.append({"boxes": torch.stack(boxes), "scores": torch.tensor(scores),
                        "labels": torch.tensor(labels), "masks": torch.stack(masks)[:, None]})
        image_ids.append(t["image_id"])
    return outputs, image_ids


# ----------------------------------------------------------------------------- conversion
def test_detections_to_lvis_results_format():
    masks = torch.zeros(3, 1, 10, 12)
    masks[0, 0, 2:5, 3:7] = 0.9
    masks[1, 0, 0:2, 0:2] = 0.4  # below the threshold: empty mask
    masks[2, 0, 5:10, 0:12] = 0.51
    out = {"boxes": torch.tensor([[3., 2., 7., 5.], [0., 0., 2., 2.], [0., 5., 12., 10.]]),
           "scores": torch.tensor([0.2, 0.9, 0.5]), "labels": torch.tensor([0, 2, 1]),
           "masks": masks}
    res = detections_to_lvis_results([out], [77], cat_ids=[10, 20, 30])
    assert [r["score"] for r in res] == pytest.approx([0.9, 0.5, 0.2])  # best first
    assert [r["category_id"] for r in res] == [30, 20, 10]
    assert res[2]["bbox"] == pytest.approx([3., 2., 4., 3.])
    assert all(r["image_id"] == 77 and isinstance(r["segmentation"]["counts"], str) for r in res)
    json.dumps(res)  # serialisable
    decoded = [mask_utils.decode({"size": r["segmentation"]["size"],
                                  "counts": r["segmentation"]["counts"].encode()}) for r in res]
    assert decoded[0].sum() == 0 and decoded[1].sum() == 5 * 12 and decoded[2].sum() == 12

    boxes_only = detections_to_lvis_results([out], [77], [10, 20, 30], with_masks=False)
    assert all("segmentation" not in r for r in boxes_only)
    shifted = dict(out, labels=out["labels"] + 1)
    assert detections_to_lvis_results([shifted], [77], [10, 20, 30], label_offset=1) == res
    with pytest.raises(ValueError, match="labels"):
        detections_to_lvis_results([shifted], [77], [10, 20, 30])
    with pytest.raises(ValueError, match="masks"):
        detections_to_lvis_results([{k: v for k, v in out.items() if k != "masks"}], [77], [1, 2, 3])


def test_top_300_per_image():
    n = 350
    out = {"boxes": torch.tensor([[0., 0., 4., 4.]]).repeat(n, 1), "scores": torch.rand(n),
           "labels": torch.zeros(n, dtype=torch.int64)}
    res = detections_to_lvis_results([out, out], [1, 2], [5], with_masks=False)
    assert len(res) == 600
    kept = sorted(r["score"] for r in res if r["image_id"] == 1)
    assert kept == pytest.approx(sorted(out["scores"].tolist())[-300:])
    limited = limit_dets_per_image([{"image_id": 1, "score": s} for s in (0.1, 0.5, 0.5, 0.9)], 2)
    assert [r["score"] for r in limited] == [0.9, 0.5]


# ----------------------------------------------------------------------------- metrics
def test_perfect_detections_score_100(val):
    paths, ds = val
    outputs, image_ids = _perfect_outputs(ds)
    results = detections_to_lvis_results(outputs, image_ids, ds.cat_ids)
    metrics = evaluate_lvis(paths["val"], results)
    for key in ("AP", "APr", "APc", "APf", "APb"):
        assert metrics[key] == pytest.approx(100.0, abs=1e-6), (key, metrics)
    assert metrics["bbox/AP50"] == pytest.approx(100.0)
    bbox_only = evaluate_lvis(paths["val"], results, iou_types=("bbox",))
    assert bbox_only["AP"] == bbox_only["APb"] == pytest.approx(100.0)
    assert "segm/AP" not in bbox_only


def test_subset_of_images(val):
    paths, ds = val
    outputs, image_ids = _perfect_outputs(ds)
    some = image_ids[:7]
    results = detections_to_lvis_results(outputs[:7], some, ds.cat_ids)
    assert evaluate_lvis(paths["val"], results, image_ids=some)["APb"] == pytest.approx(100.0)
    assert evaluate_lvis(paths["val"], results)["APb"] < 60.0  # the other images count as misses


def test_empty_results(val):
    paths, _ = val
    metrics = evaluate_lvis(paths["val"], [])
    for key in ("AP", "APr", "APc", "APf", "APb"):
        assert metrics[key] == 0.0
    assert metrics["segm/APl"] == -1.0  # no large objects in the synthetic set: undefined


def test_bad_arguments(val):
    paths, ds = val
    outputs, image_ids = _perfect_outputs(ds)
    boxes_only = detections_to_lvis_results(outputs[:2], image_ids[:2], ds.cat_ids, with_masks=False)
    with pytest.raises(ValueError, match="segmentation"):
        evaluate_lvis(paths["val"], boxes_only)
    assert evaluate_lvis(paths["val"], boxes_only, iou_types=("bbox",))["APb"] >= 0
    with pytest.raises(ValueError, match="iou_types"):
        evaluate_lvis(paths["val"], boxes_only, iou_types=("keypoints",))


def test_format_metrics_table(val):
    paths, ds = val
    outputs, image_ids = _perfect_outputs(ds)
    metrics = evaluate_lvis(paths["val"], detections_to_lvis_results(outputs, image_ids, ds.cat_ids))
    table = format_metrics_table(metrics)
    lines = table.splitlines()
    assert lines[0].split()[0] == "type" and "APr" in lines[0]
    assert lines[2].startswith("segm") and lines[3].startswith("bbox")
    assert "100.00" in lines[2] and " - " in lines[2] + " "  # APl undefined -> '-'
    assert "AP" in format_metrics_table({"AP": 12.5, "APr": -1.0})


def test_agreement_with_official_lvis_api(val):
    try:
        from lvis import LVIS, LVISEval, LVISResults
    except Exception as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"the official LVIS API (pip install lvis==0.5.3) cannot be imported: {e!r}")
    paths, ds = val
    outputs, image_ids = _noisy_outputs(ds)
    results = detections_to_lvis_results(outputs, image_ids, ds.cat_ids, max_dets_per_image=10**6)
    assert sum(r["image_id"] == image_ids[0] for r in results) > 300  # the cap is exercised
    ours = evaluate_lvis(paths["val"], results)

    # lvis 0.5.3 uses np.float, removed in NumPy 1.24: lend it for the duration of the call.
    patched = {name: typ for name, typ in (("float", float), ("int", int)) if not hasattr(np, name)}
    for name, typ in patched.items():
        setattr(np, name, typ)
    try:
        gt = LVIS(paths["val"])
        official = {}
        for iou_type in ("segm", "bbox"):
            dt = LVISResults(gt, copy.deepcopy(results), max_dets=300)
            ev = LVISEval(gt, dt, iou_type)
            ev.run()
            official[iou_type] = {k: 100.0 * float(v) for k, v in ev.get_results().items()}
    finally:
        for name in patched:
            delattr(np, name)

    for iou_type in ("segm", "bbox"):
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APr", "APc", "APf"):
            a, b = ours[f"{iou_type}/{key}"], official[iou_type][key]
            assert abs(a - b) <= 0.1, (iou_type, key, a, b)
        assert abs(ours[f"{iou_type}/AR"] - official[iou_type]["AR@300"]) <= 0.1
    # the detections are neither trivial nor hopeless
    assert 5.0 < ours["AP"] < 95.0 and 5.0 < ours["APb"] < 95.0
    assert ours["AP"] == ours["segm/AP"] and ours["APb"] == ours["bbox/AP"]
