"""Multi-level RoIAlign over the FPN levels, with the RoIAlign settings as options.

torchvision's MultiScaleRoIAlign fixes `aligned=False` (the legacy half-pixel offset) and its
configs use sampling_ratio=2; mmdetection 2.x (the official GOL code) pools with mmcv's RoIAlign
defaults, `sampling_ratio=0` (adaptive: ceil(roi size / output size) samples per bin) and
`aligned=True`. Both assign a RoI of sqrt(area) = s to level floor(log2(s / 56)), clamped to
the available levels (mmdetection's finest_scale 56 is torchvision's canonical 224 at level 4).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

# Strides of torchvision's ResNet-FPN outputs "0".."3" (the "pool" level is not pooled from).
FPN_STRIDES = (4, 8, 16, 32)


class LevelRoIAlign(nn.Module):
    """RoIAlign of each box on its FPN level; the call signature of MultiScaleRoIAlign.

    Args:
        featmap_names: the feature maps pooled from, finest first.
        output_size: pooled size (7 for boxes, 14 for masks).
        sampling_ratio: samples per bin side (0: adaptive).
        aligned: shift box corners by -0.5 px (the pixel model of mmcv / detectron2).
        strides: the stride of each feature map.
        finest_scale: boxes with sqrt(area) < 2 * finest_scale pool from the finest level,
            each doubling moves one level coarser.
    """

    def __init__(self, featmap_names: Sequence[str], output_size: Union[int, Tuple[int, int]],
                 sampling_ratio: int, aligned: bool, *, strides: Sequence[int] = FPN_STRIDES,
                 finest_scale: float = 56.0):
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError(f"LevelRoIAlign: {len(featmap_names)} feature maps but "
                             f"{len(strides)} strides")
        if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool) \
                or sampling_ratio < 0:
            raise ValueError(f"sampling_ratio={sampling_ratio!r} must be an int >= 0")
        self.featmap_names = list(featmap_names)
        self.output_size = (output_size, output_size) if isinstance(output_size, int) \
            else tuple(output_size)
        self.sampling_ratio = sampling_ratio
        self.aligned = bool(aligned)
        self.strides = tuple(int(s) for s in strides)
        self.finest_scale = float(finest_scale)

    def levels(self, boxes: Tensor) -> Tensor:
        """FPN level index of each (x1, y1, x2, y2) box."""
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        level = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return level.clamp(0, len(self.strides) - 1).to(torch.int64)

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor],
                image_shapes: List[Tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1)
                          for i, b in enumerate(boxes)])
        levels = self.levels(rois[:, 1:])
        first = features[0]
        result = first.new_zeros((rois.shape[0], first.shape[1]) + self.output_size)
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            index = torch.where(levels == level)[0]
            if index.numel() == 0:
                continue
            pooled = roi_align(feature, rois[index], self.output_size, spatial_scale=1.0 / stride,
                               sampling_ratio=self.sampling_ratio, aligned=self.aligned)
            result[index] = pooled.to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, "
                f"strides={self.strides}")
