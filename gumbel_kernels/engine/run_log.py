"""What a training run reports each iteration, written by rank 0: a record in OUT/log.jsonl, the
progress bar's fields, a log line every solver.log_every iterations when there is no progress
bar (a cluster job's log), and TensorBoard scalars in OUT/tensorboard/ when
torch.utils.tensorboard can be imported (solver.tensorboard: auto; true insists, false: off).

A record holds: iteration, epoch, lr, loss and every loss term, time (seconds of the whole
iteration: waiting for the batch and the step), data_time (seconds waiting for the batch),
eta_seconds (the remaining iterations at the median time of the last 20) and, on a GPU,
max_mem_mb (the peak memory torch has allocated on this rank's GPU since the start). Any
log.jsonl plots with `python -m gumbel_kernels.engine.plots` (loss_curve.png).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import statistics
from collections import deque
from typing import Dict, Optional, Union

import torch

log = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
_ETA_WINDOW = 20


def truncate_log(path: str, iteration: int) -> int:
    """Cuts a JSONL training log back to its records up to `iteration` (a resumed run writes
    the later ones again; a torn last line of a killed run goes too). Returns the number of
    records dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = int(record["iteration"]) <= iteration
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def _tensorboard_writer(out_dir: str, setting: Union[bool, str], purge_step: Optional[int]):
    if setting is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch's module needs the tensorboard package
        if setting is True:
            raise ImportError(f"solver.tensorboard=true but TensorBoard cannot be imported "
                              f"({error}); pip install tensorboard, or set it to auto") from None
        log.info("TensorBoard is not installed: no %s/ (pip install tensorboard)", TENSORBOARD_DIR)
        return None
    # purge_step: a resumed run drops the events it trains again, as log.jsonl does.
    return SummaryWriter(os.path.join(out_dir, TENSORBOARD_DIR), purge_step=purge_step)


class RunLog:
    """The per-iteration reports of one training process (only rank 0 writes anything).

    Args:
        out_dir: the run's folder.
        total_iters: the iteration the run stops at (for the ETA).
        start_iteration: where it starts (> 0 when resumed: later records are dropped).
        resumed: continue OUT/log.jsonl (else it is started anew).
        device: the training device (GPU memory is reported on CUDA).
        tensorboard: solver.tensorboard.
        log_every: a log line every this many iterations when `lines` is set.
        lines: write those log lines (the trainer sets it when the progress bar is off).
        main: whether this is rank 0.
    """

    def __init__(self, out_dir: str, *, total_iters: int, start_iteration: int, resumed: bool,
                 device: torch.device, tensorboard: Union[bool, str] = "auto",
                 log_every: int = 20, lines: bool = False, main: bool = True):
        self.total_iters = int(total_iters)
        self.device = device
        self.log_every = max(1, int(log_every))
        self.lines = lines
        self.times: deque = deque(maxlen=_ETA_WINDOW)
        self.file = None
        self.writer = None
        if not main:
            return
        path = os.path.join(out_dir, LOG_NAME)
        if resumed:
            dropped = truncate_log(path, start_iteration)
            if dropped:
                log.info("%s: dropped %d records after iteration %d (they are trained again)",
                         path, dropped, start_iteration)
        self.file = open(path, "a" if resumed else "w")
        self.writer = _tensorboard_writer(out_dir, tensorboard,
                                          start_iteration + 1 if resumed else None)

    def record(self, *, iteration: int, epoch: int, lr: float, losses: Dict[str, float],
               iter_time: float, data_time: float) -> dict:
        """Writes (rank 0) and returns this iteration's record."""
        self.times.append(iter_time)
        eta = statistics.median(self.times) * max(0, self.total_iters - iteration)
        record = {"iteration": iteration, "epoch": epoch, "lr": lr, **losses,
                  "time": iter_time, "data_time": data_time, "eta_seconds": eta}
        if self.device.type == "cuda":
            record["max_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("iteration", "epoch"):
                    self.writer.add_scalar(f"train/{key}", value, iteration)
        if self.file is not None and self.lines and \
                (iteration % self.log_every == 0 or iteration == self.total_iters):
            log.info("%s", self.line(record))
        return record

    def bar_fields(self, record: dict) -> Dict[str, str]:
        """The progress bar's postfix: the losses (loss_ dropped), lr, times, GPU memory."""
        fields = {"loss": f"{record['loss']:.3f}"}
        fields.update({k[len("loss_"):]: f"{v:.3f}" for k, v in record.items()
                       if k.startswith("loss_")})
        fields.update(lr=f"{record['lr']:.2e}", time=f"{record['time']:.2f}s",
                      data=f"{record['data_time']:.2f}s")
        if "max_mem_mb" in record:
            fields["mem"] = f"{record['max_mem_mb'] / 1024:.1f}G"
        return fields

    def line(self, record: dict) -> str:
        losses = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss"))
        memory = f" max_mem {record['max_mem_mb']:.0f}M" if "max_mem_mb" in record else ""
        return (f"iter {record['iteration']}/{self.total_iters} epoch {record['epoch']} "
                f"lr {record['lr']:.3e} {losses} time {record['time']:.3f}s data "
                f"{record['data_time']:.3f}s eta {format_duration(record['eta_seconds'])}{memory}")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
