"""model.weights: a local trunk file must hold every trunk weight (a missing or misshapen one
is an error naming it), a torchvision name is fetched by rank 0 first and then read by every
rank (run_on_main_first, in a real 2-process gloo group), and its architecture must match."""
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.models import resnet18
from torchvision.models._api import WeightsEnum

from gumbel_kernels.detection import build_model
from gumbel_kernels.engine import distributed as dist_utils
from gumbel_kernels.losses import build_classification_loss

TINY = {"backbone": "resnet18", "trainable_layers": 3, "min_size": [64], "max_size": 80,
        "norm": "frozen_bn"}


def _model(weights, **overrides):
    loss = build_classification_loss("gumbel", [1, 2, 3], 3)
    return build_model({**TINY, "weights": weights, **overrides}, 3, loss)


def _imagenet_like(seed=0):
    """A torchvision resnet18 state dict (fc.* included, as the released files have it)."""
    torch.manual_seed(seed)
    return resnet18().state_dict()


def test_a_complete_local_file_is_loaded(tmp_path):
    state = _imagenet_like()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": state}, path)
    body = _model(str(path)).backbone.body
    assert torch.equal(body.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.equal(body.bn1.running_var, state["bn1.running_var"])
    # Without BatchNorm counters (some exported files) is fine too, for trainable BatchNorm.
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    body = _model(str(path), norm="eval_bn").backbone.body
    assert torch.equal(body.layer4[0].downsample[1].weight, state["layer4.0.downsample.1.weight"])


def test_missing_trunk_keys_are_named(tmp_path):
    state = _imagenet_like()
    del state["layer2.1.conv1.weight"], state["layer4.0.bn2.running_mean"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        _model(str(path))
    message = str(info.value)
    assert str(path) in message and "2 of the trunk's" in message
    assert "layer2.1.conv1.weight" in message and "layer4.0.bn2.running_mean" in message


def test_another_naming_scheme_is_refused(tmp_path):
    path = tmp_path / "prefixed.pth"
    torch.save({f"backbone.{k}": v for k, v in _imagenet_like().items()}, path)
    with pytest.raises(ValueError, match=r"weights are missing: conv1\.weight.*the file has "
                                         r"backbone\.conv1\.weight"):
        _model(str(path))


def test_wrong_shapes_and_bad_files_are_named(tmp_path):
    state = _imagenet_like()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "shapes.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: \(64, 64, 1, 1\) in the file"):
        _model(str(path))
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a loadable state dict"):
        _model(str(path))
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="expected a state dict"):
        _model(str(path))


def test_a_torchvision_name_goes_through_the_same_strict_load(monkeypatch):
    state = _imagenet_like(seed=4)
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):  # no download here
        calls.append((self, kwargs))
        return state

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    body = _model("ResNet18_Weights.IMAGENET1K_V1").backbone.body
    assert len(calls) == 1 and calls[0][1]["check_hash"] and calls[0][1]["weights_only"]
    assert torch.equal(body.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    with pytest.raises(ValueError, match="ResNet50_Weights weights; model.backbone='resnet18' "
                                         "needs ResNet18_Weights"):
        _model("ResNet50_Weights.IMAGENET1K_V1")
    assert len(calls) == 1  # refused before any download
    with pytest.raises(ValueError, match="neither a file nor a torchvision weight name"):
        _model("NoSuchWeights.V1")


def test_eval_only_models_skip_the_trunk_weights(monkeypatch):
    monkeypatch.setattr(WeightsEnum, "get_state_dict",
                        lambda *a, **k: pytest.fail("downloaded weights a checkpoint replaces"))
    loss = build_classification_loss("gumbel", [1, 2, 3], 3)
    model = build_model({**TINY, "weights": "ResNet18_Weights.IMAGENET1K_V1", "norm": None}, 3,
                        loss, load_weights=False)
    # norm defaults as for a model with weights (frozen), so the checkpoint's keys fit.
    assert type(model.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"


# ----------------------------------------------------------------------------------------------
# Rank 0 first, in a real process group
# ----------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for case in ("works", "fails"):
        marker = os.path.join(folder, f"{case}.downloaded")

        def fetch():
            if rank == 0:
                time.sleep(0.5)  # a slow download: the others must wait for it
                if case == "fails":
                    raise ConnectionError("no route to download.pytorch.org")
                with open(marker, "w") as f:
                    f.write("weights")
                return "downloaded"
            with open(os.path.join(folder, f"{case}.rank{rank}.saw"), "w") as f:
                f.write(str(os.path.exists(marker)))
            return "read from the cache"

        try:
            outcome = f"ok: {dist_utils.run_on_main_first(fetch, 'downloading the weights')}"
        except Exception as error:
            outcome = f"{type(error).__name__}: {error}"
        with open(os.path.join(folder, f"{case}.rank{rank}.out"), "w") as f:
            f.write(outcome)
    dist.destroy_process_group()


def test_rank_0_fetches_first_and_a_failure_reaches_every_rank(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    works = [(tmp_path / f"works.rank{r}.out").read_text() for r in range(2)]
    assert works == ["ok: downloaded", "ok: read from the cache"]
    assert (tmp_path / "works.rank1.saw").read_text() == "True"  # only after rank 0 finished
    fails = [(tmp_path / f"fails.rank{r}.out").read_text() for r in range(2)]
    assert fails[0] == "ConnectionError: no route to download.pytorch.org"
    assert fails[1].startswith("RuntimeError: downloading the weights failed on rank 0")
    assert not (tmp_path / "fails.rank1.saw").exists()  # rank 1 never tried on its own
