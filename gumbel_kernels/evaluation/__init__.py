"""Evaluation for the detection harness: LVIS metrics (AP, APr, APc, APf, box AP), and masks
run-length encoded where they are (rle.py)."""
from .lvis_eval import (detections_to_lvis_results, evaluate_lvis, format_metrics_table,
                        image_results, limit_dets_per_image)

__all__ = ["detections_to_lvis_results", "evaluate_lvis", "format_metrics_table",
           "image_results", "limit_dets_per_image"]
