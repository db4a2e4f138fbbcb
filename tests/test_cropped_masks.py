"""mask_format="cropped": masks kept inside their boxes give exactly the full-resolution
bitmaps, their flips and torchvision's nearest resize, the same RoIAlign mask targets (chunk by
chunk) and the same training losses, at a fraction of the memory."""
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.transform import _resize_image_and_masks

from gumbel_kernels.data import LVISDataset
from gumbel_kernels.data.masks import CroppedMasks
from gumbel_kernels.data.synthetic import generate
from gumbel_kernels.data.transforms import RandomHorizontalFlip, ResizeShorterSide
from gumbel_kernels.detection import mask_targets as mask_targets_module
from gumbel_kernels.detection.mask_targets import mask_targets

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _bitmaps(k=7, h=45, w=61, seed=0):
    """k instance masks: blobs of varied size, one empty, one touching the image border."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(k, h, w, dtype=torch.uint8)
    for i in range(k - 1):
        y0 = torch.randint(0, h - 4, (1,), generator=g).item()
        x0 = torch.randint(0, w - 4, (1,), generator=g).item()
        y1 = min(h, y0 + torch.randint(2, h // 2, (1,), generator=g).item())
        x1 = min(w, x0 + torch.randint(2, w // 2, (1,), generator=g).item())
        out[i, y0:y1, x0:x1] = (torch.rand(y1 - y0, x1 - x0, generator=g) > 0.3).to(torch.uint8)
    out[k - 2, -3:, -5:] = 1  # at the bottom-right border
    out[k - 1] = 0  # empty
    return out


def test_crops_give_back_the_bitmaps_and_their_flip():
    full = _bitmaps()
    crops = CroppedMasks.from_bitmaps(full.numpy(), full.shape[1:])
    assert torch.equal(crops.bitmaps(range(len(full))), full)
    assert torch.equal(crops.flip().bitmaps(range(len(full))), full.flip(-1))
    assert torch.equal(crops.bitmaps([3, 0]), full[[3, 0]])
    assert crops.data.numel() < full.numel() / 3


@pytest.mark.parametrize("min_size,max_size", [(800, 1333), (64, 100), (37, 1000), (96, 96)])
def test_rebuilt_bitmaps_equal_torchvisions_resize(min_size, max_size):
    full = _bitmaps(h=48, w=64, seed=1)
    image = torch.rand(3, 48, 64)
    resized_image, target = _resize_image_and_masks(image, float(min_size), float(max_size),
                                                    {"masks": full})
    crops = CroppedMasks.from_bitmaps(full.numpy(), (48, 64))
    assert torch.equal(crops.bitmaps(range(len(full)), resized_image.shape[-2:]), target["masks"])


def test_the_dataset_crops_what_it_would_decode(tmp_path):
    paths = generate(tmp_path, num_classes=5, train_images=6, val_images=2, image_size=64, seed=2)
    full = LVISDataset(paths["train"], paths["images"])
    cropped = LVISDataset(paths["train"], paths["images"], mask_format="cropped")
    for i in range(len(full)):
        masks = full.get_target(i)["masks"]
        crops = cropped.get_target(i)["mask_crops"]
        assert torch.equal(crops.bitmaps(range(len(crops))), masks)
    image, target = cropped[0]
    flipped_image, flipped = RandomHorizontalFlip(1.0)(image, target)
    assert torch.equal(flipped["mask_crops"].bitmaps(range(len(target["mask_crops"]))),
                       full.get_target(0)["masks"].flip(-1))
    with pytest.raises(ValueError, match="mask_crops"):
        ResizeShorterSide([32], 64)(image, target)


@pytest.mark.parametrize("kind", ["roi_align", "bitmap"])
def test_mask_targets_from_crops_equal_those_from_resized_bitmaps(kind, monkeypatch):
    full = _bitmaps(k=9, h=48, w=64, seed=3)
    image = torch.rand(3, 48, 64)
    resized_image, target = _resize_image_and_masks(image, 80.0, 200.0, {"masks": full})
    shape = tuple(resized_image.shape[-2:])
    g = torch.Generator().manual_seed(4)
    matched = torch.randint(0, 8, (40,), generator=g)
    corners = torch.rand(40, 2, generator=g) * torch.tensor([shape[1] - 10.0, shape[0] - 10.0])
    boxes = torch.cat([corners, corners + 3 + torch.rand(40, 2, generator=g) * 40], 1)
    expected = mask_targets(kind, [boxes], [matched], [target], [shape], 28)
    crops = CroppedMasks.from_bitmaps(full.numpy(), (48, 64))
    monkeypatch.setattr(mask_targets_module, "_CHUNK_PIXELS", shape[0] * shape[1] * 3)
    got = mask_targets(kind, [boxes], [matched], [{"mask_crops": crops}], [shape], 28)
    assert torch.equal(got, expected)
    assert expected.sum() > 0


def test_lvis_like_image_with_300_instances_costs_little():
    """300 LVIS-sized instances (most small) in a 480 x 640 image: their crops take a few
    percent of the 300 full-image bitmaps, and far less than their float resize."""
    rng = np.random.default_rng(5)
    h, w = 480, 640
    bitmaps = []
    for _ in range(300):
        side = rng.choice([12, 24, 48, 96, 200], p=[0.4, 0.3, 0.15, 0.1, 0.05])
        cx, cy = rng.uniform(side / 2, w - side / 2), rng.uniform(side / 2, h - side / 2)
        poly = [cx - side / 2, cy, cx, cy - side / 2, cx + side / 2, cy, cx, cy + side / 2]
        bitmaps.append(mask_utils.decode(mask_utils.frPyObjects([poly], h, w)[0]))
    crops = CroppedMasks.from_bitmaps(bitmaps, (h, w))
    full_bytes = 300 * h * w
    assert crops.nbytes() < full_bytes / 20
    resized_float_bytes = 300 * 800 * 1067 * 4  # torchvision's transform, on the GPU
    assert crops.nbytes() < resized_float_bytes / 500


@pytest.mark.parametrize("kind", ["roi_align", "bitmap"])
def test_a_training_step_gives_the_same_losses(kind):
    from test_detection import batch, model_for

    images, targets = batch()
    cropped = [{"boxes": t["boxes"], "labels": t["labels"],
                "mask_crops": CroppedMasks.from_bitmaps(t["masks"].numpy(), t["masks"].shape[1:])}
               for t in targets]
    losses = []
    for given in (targets, cropped):
        model = model_for("gol", mask_target=kind).train()
        torch.manual_seed(7)
        losses.append({k: float(v.detach()) for k, v in model(images, given).items()})
    assert losses[0] == losses[1]
    assert losses[0]["loss_mask"] > 0
