"""The normalized (cosine) mask predictor of GOL's Mask R-CNN.

The per-class 1x1 mask classifier is replaced by a cosine similarity between the L2-normalised
pixel features and the L2-normalised class weights, times a temperature (20 in GOL): the logit
scale no longer depends on how often a class was seen, which helps the rare classes' masks.
It follows mmdetection's NormedConv2d as GOL's FCNMaskHead uses it (predictor_cfg
NormedConv2d, tempearture=20): x / (|x| + 1e-6) and w / (|w| + 1e-6) over the channels, then the
convolution *with* its bias; weight kaiming_normal (fan_out, relu) and bias 0, as
FCNMaskHead.init_weights sets its conv_logits.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

_EPS = 1e-6


class NormalizedMaskPredictor(nn.Module):
    """conv5_mask (2x deconvolution + ReLU) then temperature * cos(feature, class weight) + bias.

    Parameter names are torchvision's MaskRCNNPredictor's (conv5_mask, mask_fcn_logits).

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
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, num_classes, 1)
        self.temperature = float(temperature)
        for layer in (self.conv5_mask, self.mask_fcn_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv5_mask(x))
        features = x / (x.norm(dim=1, keepdim=True) + _EPS)
        weight = self.mask_fcn_logits.weight
        weight = weight / (weight.norm(dim=1, keepdim=True) + _EPS)
        return F.conv2d(self.temperature * features, weight, self.mask_fcn_logits.bias)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
