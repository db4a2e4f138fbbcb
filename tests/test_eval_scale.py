"""Evaluation built for LVIS scale: run lengths computed with torch ops equal pycocotools'
encoding; pasting + binarising + encoding in chunks equals encoding the fully pasted masks;
the model hands the evaluator unpasted masks; rank shards merge into one results.json; and
tools/scale_check runs end to end on a small generated set."""
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from gumbel_kernels.detection.transform import MASK_PASTES, paste_masks
from gumbel_kernels.engine import evaluator
from gumbel_kernels.engine.evaluator import merge_shards, paste_and_encode, shard_path
from gumbel_kernels.evaluation import detections_to_lvis_results
from gumbel_kernels.evaluation.rle import encode_binary_masks, run_lengths
from gumbel_kernels.tools import scale_check

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _pycocotools(binary):
    rles = mask_utils.encode(np.asfortranarray(binary.numpy().astype(np.uint8).transpose(1, 2, 0)))
    return [r["counts"].decode() for r in rles]


def test_run_lengths_equal_pycocotools_on_edge_cases():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 23, 31, generator=g) > 0.55
    masks[1] = False                    # empty
    masks[2] = True                     # full
    masks[3] = False
    masks[3, 0, 0] = True               # starts with a one: a zero-length first run
    masks[4] = False
    masks[4, -1, -1] = True             # ends with a one
    expected = _pycocotools(masks)
    for method in ("runs", "pycocotools", "auto"):
        got = encode_binary_masks(masks, method=method)
        assert [r["counts"] for r in got] == expected
        assert all(r["size"] == [23, 31] for r in got)
    assert run_lengths(masks)[2].tolist() == [0, 23 * 31]
    assert run_lengths(masks)[1].tolist() == [23 * 31]
    assert encode_binary_masks(torch.zeros(0, 5, 5, dtype=torch.bool)) == []
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        encode_binary_masks(torch.zeros(5, 5, dtype=torch.bool))


@pytest.mark.parametrize("paste", MASK_PASTES)
def test_chunked_paste_and_encode_equals_the_full_paste(paste):
    g = torch.Generator().manual_seed(1)
    k, size = 9, (57, 83)
    masks = torch.rand(k, 1, 28, 28, generator=g)
    corners = torch.rand(k, 2, generator=g) * torch.tensor([70.0, 45.0])
    boxes = torch.cat([corners, corners + 2 + torch.rand(k, 2, generator=g) * 30], 1)
    full = paste_masks(masks, boxes, size, paste)[:, 0] > 0.5
    one_per_chunk = paste_and_encode(masks, boxes, size, paste, chunk_bytes=1)
    assert [r["counts"] for r in one_per_chunk] == _pycocotools(full)
    three_per_chunk = paste_and_encode(masks, boxes, size, paste, chunk_bytes=3 * 57 * 83 * 4)
    assert three_per_chunk == one_per_chunk
    assert sum(int(mask_utils.area(dict(r, counts=r["counts"].encode()))) for r in one_per_chunk) \
        == int(full.sum())


def test_merged_shards_are_one_results_json(tmp_path):
    records = {0: [(10, [{"image_id": 10, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]),
                   (12, [])],
               1: [(11, [{"image_id": 11, "category_id": 2, "bbox": [1, 1, 2, 2], "score": 0.9},
                         {"image_id": 11, "category_id": 1, "bbox": [0, 1, 2, 2], "score": 0.1}])]}
    for rank, images in records.items():
        path = shard_path(str(tmp_path), rank)
        (tmp_path / "eval_shards").mkdir(exist_ok=True)
        with open(path, "w") as f:
            for image_id, results in images:
                f.write(f"{image_id}\t{json.dumps(results)}\n")
    path, image_ids, count = merge_shards(str(tmp_path), 2)
    expected = records[0][0][1] + records[1][0][1]
    assert image_ids == [10, 12, 11] and count == 3  # 12: evaluated, nothing found
    assert path == str(tmp_path / "results.json") and json.load(open(path)) == expected
    with pytest.raises(FileNotFoundError, match="rank 2's results"):
        merge_shards(str(tmp_path), 3)


def test_the_evaluator_gets_unpasted_masks_and_pastes_in_bounded_chunks(tmp_path, monkeypatch):
    """A stand-in detector (what Mask R-CNN returns with paste_masks off) through evaluate():
    every paste call holds at most the chunk budget, and results.json equals the results of
    the fully pasted masks."""
    g = torch.Generator().manual_seed(2)
    height, width, k = 40, 60, 12
    masks = torch.rand(k, 1, 28, 28, generator=g)
    corners = torch.rand(k, 2, generator=g) * torch.tensor([50.0, 30.0])
    boxes = torch.cat([corners, corners + 3 + torch.rand(k, 2, generator=g) * 20], 1)
    outputs = {"boxes": boxes, "scores": torch.rand(k, generator=g),
               "labels": torch.randint(1, 4, (k,), generator=g), "masks": masks}

    class Transform:
        paste_masks, mask_paste = True, "grid_sample"

    class Detector(torch.nn.Module):
        transform = Transform()

        def forward(self, images):
            assert not self.transform.paste_masks  # the evaluator asked for raw masks
            return [dict(outputs) for _ in images]

    class Images(torch.utils.data.Dataset):
        cat_ids = [7, 8, 9]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, height, width), {"image_id": 100 + i}

    pasted = []
    real_paste = evaluator.paste_masks

    def spy(m, b, size, kind):
        pasted.append(m.shape[0])
        return real_paste(m, b, size, kind)

    monkeypatch.setattr(evaluator, "paste_masks", spy)
    monkeypatch.setitem(evaluator.PASTE_CHUNK_BYTES, "cpu", 5 * height * width * 4)
    monkeypatch.setattr(evaluator, "evaluate_lvis", lambda *a, **kw: {"AP": 1.0})
    detector = Detector()
    metrics = evaluator.evaluate(detector, Images(), "unused.json", torch.device("cpu"),
                                 str(tmp_path), progress=False)
    assert metrics == {"AP": 1.0} and Detector.transform.paste_masks  # restored
    assert pasted == [5, 5, 2] * 2
    full = dict(outputs, masks=paste_masks(masks, boxes, (height, width), "grid_sample"),
                labels=outputs["labels"])
    expected = detections_to_lvis_results([full, full], [100, 101], Images.cat_ids,
                                          label_offset=1)
    assert json.load(open(tmp_path / "results.json")) == json.loads(json.dumps(expected))
    assert not (tmp_path / "eval_shards").exists()


def test_scale_check_runs_on_a_small_set(tmp_path, capsys):
    def in_process(args):  # the phases' code, without a fresh interpreter each
        return scale_check.main(["_phase"] + args)

    report = scale_check.check_eval(images=6, dets=20, postprocess_images=2, device="cpu",
                                    out=str(tmp_path), ranks=2, run_phase=in_process)
    merged = report["rank0_merge_and_eval"]
    assert merged["images"] == 6 and merged["detections"] == 120
    assert 0 <= merged["AP"] <= 100 and report["chunked"]["detections"] == 40
    assert "post-process (chunked" in scale_check.format_eval(report)
    masks = scale_check.check_train_masks(instances=40, device="cpu", out=str(tmp_path),
                                          run_phase=in_process)
    assert masks["bitmap"]["target_checksum"] == masks["cropped"]["target_checksum"]
    assert masks["cropped"]["stored_mib"] < masks["bitmap"]["stored_mib"] / 5


def test_evaluating_from_the_results_file_equals_the_list(tmp_path):
    data = scale_check.lvis_like_val(5, seed=3)
    gt = tmp_path / "val.json"
    gt.write_text(json.dumps(data))
    scale_check.write_result_shards(data, 30, str(tmp_path), ranks=2)
    path, _, count = merge_shards(str(tmp_path), 2)
    results = json.load(open(path))
    assert count == len(results) == 150
    from gumbel_kernels.evaluation import evaluate_lvis
    assert evaluate_lvis(str(gt), path) == evaluate_lvis(str(gt), results)
    assert json.load(open(path)) == results  # the list evaluated is not the one annotated
