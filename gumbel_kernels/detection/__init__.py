"""torchvision Mask R-CNN pieces for GOL: the RoI head with a pluggable classification loss, the
normalized mask predictor and the model builder."""
from .mask_head import NormalizedMaskPredictor
from .model import build_model
from .roi_heads import GOLBoxPredictor, GOLRoIHeads, to_gol_labels

__all__ = ["GOLBoxPredictor", "GOLRoIHeads", "NormalizedMaskPredictor", "build_model",
           "to_gol_labels"]
