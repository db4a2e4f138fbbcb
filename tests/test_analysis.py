"""The paper-figure analyses (gumbel_kernels.analysis) on hand-made LVIS-format data."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from gumbel_kernels.analysis import __main__ as cli
from gumbel_kernels.analysis.distributions import (category_table, grid_cells,
                                                   object_distributions, skew_summary)
from gumbel_kernels.analysis.kl import kl_divergence, per_class_kl, smoothed
from gumbel_kernels.analysis.weight_norms import class_weight_norms, classifier_weight


def _ann(ann_id, image_id, cat_id, bbox):
    return {"id": ann_id, "image_id": image_id, "category_id": cat_id, "bbox": bbox,
            "area": bbox[2] * bbox[3], "segmentation": []}


def hand_made():
    """Two images; on a 2x2 grid the object centres fall in known cells (row, col):
    image 1 (100 x 100): A at (25, 25) -> (0, 0); B at (75, 25) -> (0, 1)
    image 2 (200 x 100): A at (50, 75) -> (1, 0); A at (150, 25) -> (0, 1);
                         A at (155, 20) -> (0, 1) (a second centre in the same image and cell)
    """
    return {
        "images": [{"id": 1, "width": 100, "height": 100},
                   {"id": 2, "width": 200, "height": 100}],
        "categories": [{"id": 20, "name": "B"},  # no frequency/image_count: counted (1 -> r)
                       {"id": 10, "name": "A", "image_count": 200, "frequency": "f"}],
        "annotations": [_ann(1, 1, 10, [15, 15, 20, 20]), _ann(2, 1, 20, [70, 20, 10, 10]),
                        _ann(3, 2, 10, [40, 70, 20, 10]), _ann(4, 2, 10, [140, 20, 20, 10]),
                        _ann(5, 2, 10, [150, 10, 10, 20])],
    }


def test_category_table_and_cells():
    cats = category_table(hand_made())
    assert cats.ids == [10, 20] and cats.names == ["A", "B"]
    assert cats.image_counts == [200, 1]
    assert cats.frequencies == ["f", "r"]
    assert cats.frequency_order() == [0, 1]
    cells = grid_cells(np.array([0.0, 0.5, 1.0, -0.1, 0.49]), np.array([0.0, 0.0, 1.0, 0.7, 0.51]), 2)
    assert cells.tolist() == [0, 1, 3, 2, 2]


def test_distributions_on_hand_made_json():
    dist = object_distributions(hand_made(), grid=2)
    np.testing.assert_allclose(dist.p_obj, [[0.5, 1.0], [0.5, 0.0]])
    a, b = 0, 1  # contiguous indices: categories sorted by id
    np.testing.assert_allclose(dist.p_y_given_obj[a], [[1.0, 2 / 3], [1.0, 0.0]])
    np.testing.assert_allclose(dist.p_y_given_obj[b], [[0.0, 1 / 3], [0.0, 0.0]])
    np.testing.assert_allclose(dist.p_y[a], [[0.5, 2 / 3], [0.5, 0.0]])
    np.testing.assert_allclose(dist.p_y[b], [[0.0, 1 / 3], [0.0, 0.0]])
    np.testing.assert_allclose(dist.objects_per_cell, [[1, 3], [1, 0]])
    np.testing.assert_allclose(dist.group_mean(dist.p_y, "r"), dist.p_y[b])
    assert np.isnan(dist.group_mean(dist.p_y, "c")).all()
    summary = skew_summary(dist.p_y)
    assert summary["count"] == 8 and summary["fraction_zero"] == pytest.approx(4 / 8)
    assert summary["mean"] == pytest.approx((0.5 + 2 / 3 + 0.5 + 1 / 3) / 8)


def test_distributions_cli(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(hand_made()))
    out = tmp_path / "dist"
    summary = cli.main(["distributions", "--ann", str(ann), "--grid", "2", "--out", str(out)])
    for name in ("p_obj.png", "p_y_given_obj.png", "p_y.png", "p_y_histogram.png",
                 "distributions.csv", "distributions_classes.csv", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "distributions.csv")))
    assert [(r["row"], r["col"]) for r in rows] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert [float(r["p_obj"]) for r in rows] == pytest.approx([0.5, 1.0, 0.5, 0.0])
    assert [float(r["p_y_mean_f"]) for r in rows] == pytest.approx([0.5, 2 / 3, 0.5, 0.0])
    assert summary["num_objects"] == 5 and summary["num_images"] == 2


def test_kl_identical_is_zero_and_hand_computed_pair():
    hist = np.array([[3.0, 1.0, 0.0], [0.0, 5.0, 5.0]])
    np.testing.assert_array_equal(kl_divergence(hist, hist * 7.0), [0.0, 0.0])
    # g = (0.75, 0.25), p = (0.5, 0.5), no smoothing:
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kl_divergence(np.array([3.0, 1.0]), np.array([1.0, 1.0]), eps=0.0) == \
        pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.1308121, abs=1e-7)
    # Smoothing eps = 0.1 over K = 2 cells: x~ = (x + 0.1) / 1.2.
    g = np.array([0.85, 0.35]) / 1.2
    p = np.array([0.6, 0.6]) / 1.2
    assert kl_divergence(np.array([3.0, 1.0]), np.array([2.0, 2.0]), eps=0.1) == \
        pytest.approx(float(np.sum(g * np.log(g / p))), rel=1e-12)
    # Empty prediction -> uniform; empty ground truth -> NaN.
    np.testing.assert_allclose(smoothed(np.zeros((1, 4)), 0.0), [[0.25] * 4])
    assert np.isnan(kl_divergence(np.zeros(3), np.ones(3)))


def _det(image_id, cat_id, centre, score):
    return {"image_id": image_id, "category_id": cat_id, "score": score,
            "bbox": [centre[0] - 2, centre[1] - 2, 4, 4]}


def test_per_class_kl_on_hand_made_json(tmp_path):
    data = hand_made()
    # A: the detections reproduce the gt histogram (1, 2, 1, 0) up to a scale -> KL 0.
    # B: gt (0, 1, 0, 0); predicted (0, 0.5, 0, 0.5) -> KL = log 2 (eps -> 0).
    results = [_det(1, 10, (25, 25), 0.4), _det(2, 10, (150, 25), 0.8),
               _det(2, 10, (50, 75), 0.4),
               _det(1, 20, (75, 25), 0.3), _det(2, 20, (150, 75), 0.3),
               _det(99, 20, (5, 5), 0.9), _det(1, 999, (5, 5), 0.9)]  # unknown image/category
    out = per_class_kl(results, data, grid=2, eps=1e-12)
    assert out["kl"][0] == pytest.approx(0.0, abs=1e-9)
    assert out["kl"][1] == pytest.approx(math.log(2.0), abs=1e-9)
    assert out["num_gt"].tolist() == [4, 1] and out["num_dets"].tolist() == [3, 2]
    assert out["skipped"] == 2

    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    res = tmp_path / "res.json"
    res.write_text(json.dumps(results))
    same = tmp_path / "same.json"
    same.write_text(json.dumps([dict(a, score=0.5) for a in data["annotations"]]))
    summary = cli.main(["kl", "--results", str(res), str(same), "--names", "model", "oracle",
                        "--ann", str(ann), "--grid", "2", "--eps", "1e-12",
                        "--out", str(tmp_path / "kl")])
    assert summary["oracle"]["all"] == pytest.approx(0.0, abs=1e-9)
    assert summary["model"]["rare"] == pytest.approx(math.log(2.0), abs=1e-9)
    rows = list(csv.DictReader(open(tmp_path / "kl" / "kl.csv")))
    assert [r["name"] for r in rows] == ["A", "B"]  # by training frequency
    assert float(rows[1]["kl_model"]) == pytest.approx(math.log(2.0), abs=1e-6)
    assert (tmp_path / "kl" / "kl.png").stat().st_size > 0
    assert (tmp_path / "kl" / "kl_groups.png").stat().st_size > 0


def test_weight_norms_from_a_fake_checkpoint(tmp_path):
    # Classes sorted by id: A (10) then B (20); the last row is background.
    weight = torch.tensor([[3.0, 4.0], [1.0, 0.0], [7.0, 7.0]])
    checkpoint = {"model": {"module.roi_heads.box_predictor.cls_score.weight": weight,
                            "module.roi_heads.box_predictor.cls_score.bias": torch.zeros(3)},
                  "epoch": 3}
    loaded = classifier_weight(checkpoint)
    np.testing.assert_allclose(class_weight_norms(loaded, 2), [5.0, 1.0])
    np.testing.assert_allclose(class_weight_norms(loaded.flip(0), 2, "first"), [1.0, 5.0])
    np.testing.assert_allclose(class_weight_norms(loaded[:2], 2), [5.0, 1.0])
    with pytest.raises(ValueError, match="rows"):
        class_weight_norms(loaded, 5)
    with pytest.raises(KeyError, match="no unique weight"):
        classifier_weight(checkpoint, key="roi_heads.box_predictor.bbox_pred.weight")

    path = tmp_path / "model.pt"
    torch.save(checkpoint, path)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(hand_made()))
    out = tmp_path / "norms"
    summary = cli.main(["weight-norms", "--checkpoint", str(path), "--names", "gumbel",
                        "--ann", str(ann), "--out", str(out)])
    assert summary["gumbel"] == {"rare": pytest.approx(1.0), "common": None,
                                 "frequent": pytest.approx(5.0)}
    rows = list(csv.DictReader(open(out / "weight_norms.csv")))
    assert [(r["name"], r["frequency"], float(r["norm_gumbel"])) for r in rows] == \
        [("A", "f", 5.0), ("B", "r", 1.0)]
    assert (out / "weight_norms.png").stat().st_size > 0
