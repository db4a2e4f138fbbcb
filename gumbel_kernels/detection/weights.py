"""ImageNet weights of the ResNet trunk (`model.weights`): a local state-dict file or a
torchvision weight name, loaded by one strict path.

- A local file (torch.load with weights_only=True; a {"state_dict": ...} or {"model": ...}
  wrapper is unwrapped) must hold every weight of the trunk under torchvision's ResNet names
  (conv1.weight, layer1.0.conv1.weight, ...): a missing one is an error naming it, since
  training on from a random layer would only show up as a worse AP days later. BatchNorm's
  num_batches_tracked counters and a classifier's fc.* are not trunk weights.
- A torchvision name (ResNet50_Weights.IMAGENET1K_V1) must belong to model.backbone; under
  torchrun rank 0 downloads it into the torch hub cache first (behind a barrier), then every
  rank reads the cached file, so eight processes never race to download the same file.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Tuple

import torch
from torch import Tensor, nn
from torchvision.models import get_weight

from ..engine import distributed as dist_utils

log = logging.getLogger(__name__)

# Keys of a classification checkpoint that the detection trunk does not have.
_NOT_TRUNK = ("fc.",)


def _unwrap(state, source: str) -> Dict[str, Tensor]:
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"model.weights={source}: expected a state dict (parameter name -> "
                         f"tensor) of a torchvision ResNet")
    return state


def read_trunk_weights(weights: str, backbone: str) -> Tuple[Dict[str, Tensor], str]:
    """(state dict, a name of where it came from) for model.weights `weights`."""
    weights = str(weights)
    if os.path.exists(weights):
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds on a bad file
            raise ValueError(f"model.weights={weights}: not a loadable state dict "
                             f"({type(error).__name__}: {' '.join(str(error).split())[:200]})") \
                from None
        return _unwrap(state, weights), weights
    try:
        enum = get_weight(weights)
    except (ValueError, KeyError) as error:
        raise ValueError(f"model.weights={weights!r} is neither a file nor a torchvision weight "
                         f"name ({error})") from None
    expected = f"{backbone}_weights"
    if type(enum).__name__.lower() != expected:
        raise ValueError(f"model.weights={weights!r} are {type(enum).__name__} weights; "
                         f"model.backbone={backbone!r} needs {backbone.replace('resnet', 'ResNet')}"
                         f"_Weights.<name>")

    def fetch():
        return enum.get_state_dict(progress=dist_utils.is_main(), check_hash=True,
                                   map_location="cpu", weights_only=True)

    state = dist_utils.run_on_main_first(fetch, f"downloading {weights} ({enum.url})")
    return _unwrap(state, weights), weights


def load_trunk_weights(body: nn.Module, state: Dict[str, Tensor], source: str) -> None:
    """Loads `state` into the ResNet trunk `body`; raises ValueError naming the missing keys
    or the mismatching shapes."""
    shapes = body.state_dict()
    wanted = [k for k in shapes if not k.endswith("num_batches_tracked")]
    missing = [k for k in wanted if k not in state]
    if missing:
        some = ", ".join(missing[:8])
        if len(missing) > 8:
            some += f", ... ({len(missing)} in all)"
        found = ", ".join(list(state)[:3])
        raise ValueError(f"model.weights={source}: {len(missing)} of the trunk's {len(wanted)} "
                         f"weights are missing: {some}. Expected torchvision ResNet names "
                         f"(conv1.weight, layer1.0.conv1.weight, ...); the file has {found}, ...")
    wrong = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(shapes[k].shape)} in the model"
             for k in wanted if tuple(state[k].shape) != tuple(shapes[k].shape)]
    if wrong:
        raise ValueError(f"model.weights={source}: {len(wrong)} weights have the wrong shape "
                         f"(another ResNet depth?): " + "; ".join(wrong[:4]))
    extra = [k for k in state if k not in shapes and not k.startswith(_NOT_TRUNK)]
    if extra:
        log.warning("model.weights=%s: %d keys are not trunk weights and are ignored (%s)",
                    source, len(extra), ", ".join(extra[:5]))
    body.load_state_dict({k: v for k, v in state.items() if k in shapes}, strict=False)
    log.info("loaded the %d trunk weights of %s", len(wanted), source)
