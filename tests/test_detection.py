"""Detection pieces on a tiny synthetic batch: one training step per method (finite loss, gradient
reaching the backbone), inference outputs, the normalized mask predictor, the label mapping."""
import pytest
import torch

from gumbel_kernels.detection import NormalizedMaskPredictor, build_model, to_gol_labels
from gumbel_kernels.losses import build_classification_loss

NUM_CLASSES = 5
COUNTS = [1, 3, 40, 200, 900]
TINY = {"backbone": "resnet18", "weights": None, "min_size": [96], "max_size": 128,
        "box_batch_size_per_image": 32, "rpn_pre_nms_top_n": [100, 50],
        "rpn_post_nms_top_n": [50, 25], "detections_per_img": 20}


def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 112, generator=g), torch.rand(3, 80, 96, generator=g)]
    masks0 = torch.zeros(1, 96, 112, dtype=torch.uint8)
    masks0[0, 10:50, 20:60] = 1
    masks1 = torch.zeros(2, 80, 96, dtype=torch.uint8)
    masks1[0, 5:40, 5:40] = 1
    masks1[1, 30:70, 40:90] = 1
    targets = [{"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1]),
                "masks": masks0},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 40.0], [40.0, 30.0, 90.0, 70.0]]),
                "labels": torch.tensor([3, 5]), "masks": masks1}]
    return images, targets


def model_for(method, **overrides):
    torch.manual_seed(0)
    kwargs = {"lambda_": 0.01} if method in ("eql", "droploss", "gol") else {}
    loss = build_classification_loss(method, COUNTS, 1000, **kwargs)
    return build_model({**TINY, **overrides}, NUM_CLASSES, loss)


@pytest.mark.parametrize("method", ["softmax", "sigmoid", "gumbel", "eql", "droploss", "gol",
                                    "gumbel_ce"])
def test_one_training_step(method):
    model = model_for(method, normalized_mask=method == "gol", nms=0.3)
    model.train()
    images, targets = batch()
    losses = model(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    first_conv = model.backbone.body.conv1.weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    cls = model.roi_heads.box_predictor.cls_score.weight
    assert cls.grad is not None and cls.grad.abs().sum() > 0


def test_inference_output_format():
    model = model_for("gol", normalized_mask=True, nms=0.3)
    model.eval()
    images, _ = batch()
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        k = out["boxes"].shape[0]
        assert 0 < k <= 20
        assert out["boxes"].shape == (k, 4) and out["scores"].shape == (k,)
        assert out["masks"].shape == (k, 1, *image.shape[1:])
        assert bool((out["scores"] > 1e-4).all()) and bool((out["scores"] <= 1).all())
        assert bool((out["labels"] >= 1).all() and (out["labels"] <= NUM_CLASSES).all())
        # Gumbel scores of the raw logits: the initial bias -2 gives about exp(-e^2).
        assert out["scores"].max() < 0.5


def test_classifier_initialisation_follows_gol():
    predictor = model_for("gol").roi_heads.box_predictor
    assert torch.all(predictor.cls_score.weight == 0.001)
    assert torch.all(predictor.cls_score.bias == -2.0)
    assert predictor.cls_score.out_features == NUM_CLASSES
    assert predictor.bbox_pred.out_features == (NUM_CLASSES + 1) * 4
    assert model_for("softmax").roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1


def test_normalized_mask_predictor_is_a_scaled_cosine():
    predictor = NormalizedMaskPredictor(8, 4, 3, temperature=20.0)
    x = torch.randn(2, 8, 7, 7)
    logits = predictor(x)
    assert logits.shape == (2, 3, 14, 14)
    assert logits.abs().max() <= 20.0 + 1e-4  # |cos| <= 1
    # Scaling the features does not change cosine logits.
    torch.testing.assert_close(predictor(3.0 * x), logits, rtol=1e-4, atol=1e-4)


def test_label_mapping():
    labels = torch.tensor([0, 1, 5, 3])
    assert to_gol_labels(labels, 5).tolist() == [5, 0, 4, 2]
