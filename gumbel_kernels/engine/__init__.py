"""Training engine of the detection harness: configs, the training loop, checkpoints, distributed
helpers and LVIS evaluation."""
