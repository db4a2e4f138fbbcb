"""Evaluation for the detection harness: LVIS metrics (AP, APr, APc, APf, box AP)."""
from .lvis_eval import (detections_to_lvis_results, evaluate_lvis, format_metrics_table,
                        limit_dets_per_image)

__all__ = ["detections_to_lvis_results", "evaluate_lvis", "format_metrics_table",
           "limit_dets_per_image"]
