"""Small command-line tools around the training harness (`python -m gumbel_kernels.tools.<name>`):
convert_mmdet (official mmdetection 2.x checkpoints -> harness checkpoints), plot_log (loss
curves from any log.jsonl) and scale_check (memory and time of the LVIS-scale evaluation and of
the training mask targets)."""
