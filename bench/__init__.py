"""Microbenchmarks of the fused GOL loss against the literal GOL code and torch.compile.

Every run appends rows of one fixed schema to bench/results/gol_loss.csv (bench.common);
bench.plot draws its figure from that CSV alone.
"""
