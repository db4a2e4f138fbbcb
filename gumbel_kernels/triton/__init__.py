"""Triton kernels of gumbel-kernels (gumbel_kernels.triton.gol_loss)."""
