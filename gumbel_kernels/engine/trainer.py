"""The training loop: SGD with linear warm-up and step decay, AMP, DDP, atomic checkpoints with an
exact resume, per-epoch model snapshots, a progress bar, a JSONL log and TensorBoard (run_log.py).

Files: OUT/checkpoint.pt is the rolling training state (every solver.checkpoint_every
iterations, at the end and on a stop signal: what --resume reads); OUT/snapshots/ keeps the
model at chosen points for evaluation (solver.snapshots: "steps", the default: after the last
iteration before each learning-rate step and at the end of the schedule; "epochs": also at the
end of every epoch; "none"), named epoch_<E>.pt at an epoch's end (the standard schedules' steps
are), else iter_<N>.pt: `--eval-only --checkpoint OUT/snapshots/epoch_16.pt`.

Exact resume: the data order is a function of (seed, epoch) (the sampler) and of the position in
the epoch (saved), the DataLoader draws its worker seeds from its own generator, and the global
RNG states are saved; so a resumed run takes the same next step as an uninterrupted one. With
data.num_workers > 0 the random flips of the rest of the interrupted epoch are drawn by fresh
workers, so only the order, not the flips, is replayed exactly.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Dict, List, Optional

import torch
from torch import nn
from tqdm import tqdm

from ..data import aspect_ratio_groups, collate_fn, make_batches
from . import distributed as dist_utils
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import SCHEDULES, ConfigError, resume_conflicts
from .run_log import RunLog

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pt"
SNAPSHOT_DIR = "snapshots"
_RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "iteration", "epoch",
                "batch_in_epoch", "rng", "config")


class _Batches(torch.utils.data.Sampler):
    """A fixed list of index batches (the rest of an epoch)."""

    def __init__(self, batches: List[List[int]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def scaled_lr(solver: dict, total_batch: int) -> float:
    """Linear scaling rule: base_lr is for base_batch_size images per step (0.02 for 16)."""
    lr = solver["base_lr"] * total_batch / solver["base_batch_size"]
    if total_batch != solver["base_batch_size"]:
        log.warning("total batch %d differs from %d: lr scaled linearly to %.5f", total_batch,
                    solver["base_batch_size"], lr)
    return lr


def lr_steps(solver: dict, iters_per_epoch: int):
    """(total iterations, the iterations from which the lr is 10x lower each time)."""
    schedule_epochs, step_epochs = SCHEDULES[solver["schedule"]]
    epochs = solver["epochs"] or schedule_epochs
    total = max(1, epochs * iters_per_epoch)
    return total, [round(total * e / schedule_epochs) for e in step_epochs]


def snapshot_name(iteration: int, epoch_done: Optional[int], solver: dict,
                  steps: List[int], total: int) -> Optional[str]:
    """The snapshot file the model gets after `iteration` (epoch_done: the epoch that has just
    ended, else None), or None (see the module docstring)."""
    kind = solver["snapshots"]
    wanted = kind != "none" and (iteration in steps or iteration == total
                                 or (kind == "epochs" and epoch_done is not None))
    if not wanted:
        return None
    return f"epoch_{epoch_done:02d}.pt" if epoch_done is not None else f"iter_{iteration:07d}.pt"


def schedule(solver: dict, iters_per_epoch: int):
    """(total iterations, the lr steps of lr_steps, lr factor per iteration): warm-up, then
    x0.1 at the schedule's steps, placed at the same fraction of training when `epochs`
    overrides the schedule's length."""
    total, steps = lr_steps(solver, iters_per_epoch)
    warmup, factor = int(solver["warmup_iters"]), float(solver["warmup_factor"])

    def lr_factor(iteration: int) -> float:
        scale = 0.1 ** sum(iteration >= s for s in steps)
        if iteration < warmup:
            alpha = iteration / warmup
            scale *= factor * (1 - alpha) + alpha
        return scale

    return total, steps, lr_factor


class _StopRequest:
    """SIGINT/SIGTERM: finish the step, write a checkpoint, exit."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: stopping after this step (checkpoint first)", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def load_resume_state(path: str, cfg: dict, allow_pickle: bool = False) -> dict:
    """The checkpoint `--resume` continues from, after checking that it is a training checkpoint
    of this harness and that `cfg` changes only what a resume may change (RESUME_MAY_CHANGE:
    e.g. max_iters, checkpoint_every, eval; not the model, the loss or the solver, whose
    restored optimizer and schedule would silently keep the old values)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    state = load_checkpoint(path, allow_pickle=allow_pickle)
    missing = [k for k in _RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"--resume: {path} is not a training checkpoint of this harness "
                              f"(it lacks {', '.join(missing)})")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"--resume: {path} holds no config mapping (got "
                              f"{type(state['config']).__name__})")
    conflicts = resume_conflicts(state["config"], cfg)
    if conflicts:
        raise ConfigError(f"--resume: the config differs from the one {path} was trained with in "
                          f"keys a resumed run cannot change: {'; '.join(conflicts)}. Restore "
                          f"them, or start a new run in another --out")
    return state


def train(cfg: dict, model: nn.Module, dataset, sampler, device: torch.device, out_dir: str,
          resume_state: Optional[dict] = None, progress: bool = True) -> Dict[str, float]:
    """Trains `model` (already on `device`, DDP-wrapped if distributed); returns the last losses.

    `resume_state` (from load_resume_state) continues that run exactly; otherwise OUT/log.jsonl
    is started anew. solver.max_iters caps the schedule (0: no step at all)."""
    solver = cfg["solver"]
    batch_size = int(solver["batch_size"])
    world = dist_utils.world_size()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=scaled_lr(solver, batch_size * world),
                                momentum=solver["momentum"], weight_decay=solver["weight_decay"])
    iters_per_epoch = max(1, math.ceil(len(sampler) / batch_size))
    total_iters, steps, lr_factor = schedule(solver, iters_per_epoch)
    log.info("an epoch: %d images per rank, %d iterations; %d iterations in all, lr x0.1 from "
             "iterations %s; snapshots: %s", len(sampler), iters_per_epoch, total_iters,
             ", ".join(map(str, steps)), solver["snapshots"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    use_amp = bool(solver["amp"])
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and device.type == "cuda")
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    iteration, epoch, batch_in_epoch = 0, 0, 0
    checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
    if resume_state is not None:
        state = resume_state
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        iteration, epoch, batch_in_epoch = state["iteration"], state["epoch"], state["batch_in_epoch"]
        set_rng_state(state["rng"])
        log.info("resumed from %s at iteration %d", checkpoint_path, iteration)
    max_iters = solver["max_iters"]
    stop_at = total_iters if max_iters is None else min(total_iters, int(max_iters))
    if iteration >= stop_at:
        log.info("at iteration %d of %d already: nothing to train", iteration, stop_at)

    def checkpoint():
        if dist_utils.is_main():
            save_checkpoint(checkpoint_path, {
                "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "iteration": iteration, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "rng": rng_state(), "config": cfg})
        dist_utils.barrier()

    def snapshot(name: str, epochs_completed: int):
        if dist_utils.is_main():
            save_checkpoint(os.path.join(out_dir, SNAPSHOT_DIR, name), {
                "model": _unwrap(model).state_dict(), "iteration": iteration,
                "epochs_completed": epochs_completed, "config": cfg})
            log.info("snapshot %s/%s at iteration %d", SNAPSHOT_DIR, name, iteration)
        dist_utils.barrier()

    show_bar = progress and dist_utils.is_main()
    run_log = RunLog(out_dir, total_iters=stop_at, start_iteration=iteration,
                     resumed=resume_state is not None, device=device,
                     tensorboard=solver["tensorboard"], log_every=int(solver["log_every"]),
                     lines=not show_bar, main=dist_utils.is_main())
    bar = tqdm(total=stop_at, initial=iteration, disable=not show_bar, desc="train",
               dynamic_ncols=True)
    last: Dict[str, float] = {}
    model.train()
    loader_generator = torch.Generator().manual_seed(int(cfg["seed"]))
    groups = aspect_ratio_groups(dataset) if cfg["data"]["aspect_ratio_grouping"] else None
    with _StopRequest() as stop:
        while iteration < stop_at and not stop.requested:
            sampler.set_epoch(epoch)
            epoch_batches = make_batches(list(sampler), batch_size, groups)
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=_Batches(epoch_batches[batch_in_epoch:]),
                collate_fn=collate_fn, num_workers=int(cfg["data"]["num_workers"]),
                generator=loader_generator)
            tick = time.perf_counter()
            for images, targets in loader:
                data_time = time.perf_counter() - tick
                images = [image.to(device, non_blocking=True) for image in images]
                targets = [_to_torchvision_target(t, device) for t in targets]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    losses = model(images, targets)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at iteration {iteration}: "
                                             f"{ {k: float(v) for k, v in losses.items()} }")
                lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler moves it)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if solver["clip_grad_norm"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, float(solver["clip_grad_norm"]))
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                iteration += 1
                batch_in_epoch += 1
                last = {"loss": float(loss.detach())}  # the float() waits for the step
                last.update({k: float(v.detach()) for k, v in losses.items()})
                record = run_log.record(iteration=iteration, epoch=epoch, lr=lr, losses=last,
                                        iter_time=time.perf_counter() - tick,
                                        data_time=data_time)
                if show_bar:  # the postfix is formatted only where a bar shows it
                    bar.set_postfix(run_log.bar_fields(record), refresh=False)
                bar.update(1)
                every = int(solver["checkpoint_every"] or 0)
                if every and iteration % every == 0 and iteration < stop_at:
                    checkpoint()
                ended = epoch + 1 if batch_in_epoch >= len(epoch_batches) else None
                name = snapshot_name(iteration, ended, solver, steps, total_iters)
                if name is not None:
                    snapshot(name, epoch if ended is None else ended)
                if iteration >= stop_at or stop.requested:
                    break
                tick = time.perf_counter()
            if batch_in_epoch >= len(epoch_batches):
                epoch += 1
                batch_in_epoch = 0
        checkpoint()
    bar.close()
    run_log.close()
    if stop.requested:
        raise KeyboardInterrupt(f"stopped at iteration {iteration}; resume with --resume")
    return last


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _to_torchvision_target(target: dict, device: torch.device) -> dict:
    """Dataset targets (labels 0..C-1) -> torchvision's (1..C, 0 = background). `polygons`
    stay on the CPU, where the polygon mask targets rasterise them; `mask_crops` travel as
    one buffer."""
    out = {"boxes": target["boxes"].to(device), "labels": (target["labels"] + 1).to(device)}
    if "masks" in target:
        out["masks"] = target["masks"].to(device)
    if "mask_crops" in target:
        out["mask_crops"] = target["mask_crops"].to(device)
    if "polygons" in target:
        out["polygons"] = target["polygons"]
    return out
