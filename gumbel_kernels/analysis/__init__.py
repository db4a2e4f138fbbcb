"""Analyses of the GOL paper's figures, as `python -m gumbel_kernels.analysis <subcommand>`.

- distributions (Fig. 2): P(obj, u), P(y | obj, u), P(y, u) on a grid of object centres.
- kl (Fig. 5): per-class KL(gt || predicted) of the spatial score distributions.
- weight-norms (Fig. 1(ii)): L2 norm of each class's classifier weight by training frequency.
Each writes PNG plots (matplotlib, Agg) and CSV files into --out; the definitions are in each
module's docstring.
"""
from .distributions import category_table, object_distributions, skew_summary
from .kl import kl_divergence, per_class_kl, smoothed, spatial_histograms
from .weight_norms import class_weight_norms, classifier_weight

__all__ = ["category_table", "object_distributions", "skew_summary", "kl_divergence",
           "per_class_kl", "smoothed", "spatial_histograms", "class_weight_norms",
           "classifier_weight"]
