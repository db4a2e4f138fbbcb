"""Small command-line tools around the training harness (`python -m gumbel_kernels.tools.<name>`):
convert_mmdet (official mmdetection 2.x checkpoints -> checkpoints of this harness) and
scale_check (memory and time of the LVIS-scale evaluation and of the training mask targets,
on generated data)."""
