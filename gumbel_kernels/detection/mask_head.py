"""The normalized (cosine) mask predictor of GOL's Mask R-CNN.

The per-class 1x1 mask classifier is replaced by a cosine similarity between the L2-normalised
pixel features and the L2-normalised class weights, times a temperature (20 in GOL): the logit
scale no longer depends on how often a class was seen, which helps the rare classes' masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NormalizedMaskPredictor(nn.Module):
    """conv5_mask (2x deconvolution + ReLU) then temperature * cos(feature, class weight).

    Args:
        in_channels: channels of the mask head's output.
        dim_reduced: channels after the deconvolution.
        num_classes: output masks, torchvision's C + 1 (index 0 is background).
        temperature: the scale of the cosine logits.
    """

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int,
                 temperature: float = 20.0):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        self.weight = nn.Parameter(torch.empty(num_classes, dim_reduced))
        self.temperature = temperature
        nn.init.kaiming_normal_(self.conv5_mask.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv5_mask.bias)
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv5_mask(x))
        features = F.normalize(x, dim=1, eps=1e-6)
        weights = F.normalize(self.weight, dim=1, eps=1e-6)
        return self.temperature * F.conv2d(features, weights[:, :, None, None])

