"""The training loop: step, evaluate, log, checkpoint.  Helpers do the work.

Placement (parallel.py) decides where every tensor lives; the loop is the same
for every split mode.  Figures that need a host sync (loss, accuracy, NaN
checks) are accumulated on the device and read only at log intervals, epoch
ends and checkpoints.
"""
from __future__ import annotations

import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from distalex import checkpoint
from distalex.config import to_container
from distalex.data import build_data
from distalex.parallel import Placement, make_accelerator, setup
from distalex.schedule import LRSchedule
from distalex.tracking import RUN_FILES, RunLog, run_name


class RunDirError(RuntimeError):
    """train.output_dir holds another run (exit status 2)."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf (exit status 1; the last good checkpoint is kept)."""


class Interrupted(RuntimeError):
    """SIGTERM/SIGINT: the step finished and a checkpoint was written."""

    def __init__(self, signum: int, path):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {path}; "
                         f"continue with train.resume=auto")
        self.signum = signum


@dataclass
class Position:
    epoch: int = 0     # epoch being trained
    batch: int = 0     # next batch of that epoch
    step: int = 0      # optimizer steps done


@dataclass
class EpochStats:
    """Running sums of the current epoch, kept on the device until read."""
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    train_time: float = 0.0
    wall_before: float = 0.0   # wall time of earlier (pre-resume) segments of the run
    train_examples: float = 0.0
    train_time_total: float = 0.0


class GracefulStop:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def prepare_output_dir(cfg, resume_path, is_main: bool) -> None:
    out = Path(cfg.train.output_dir)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume_path is not None or not existing:
        return
    if not cfg.train.overwrite:
        why = "no checkpoint to resume from" if cfg.train.resume == "auto" else "train.resume is unset"
        raise RunDirError(f"train.output_dir '{out}' already holds a run ({', '.join(existing)}; {why}); "
                          f"pass train.resume=auto to continue it or train.overwrite=true to replace it")
    if is_main:
        for name in existing:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def evaluate(net, loader, batch_size: int, placement: Placement, accelerator, num_classes: int) -> dict:
    """Top-1 (and top-5) accuracy over the whole test set; ten-crop batches
    ([B, 10, C, H, W]) average the softmax over the crops (paper §4.1)."""
    was_training = net.training
    net.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=placement.device)  # top1, top5, n
    k = min(5, num_classes)
    for x, y in loader.eval_batches(batch_size):
        with accelerator.autocast():
            if x.dim() == 5:
                b, crops = x.shape[:2]
                scores = F.softmax(net(x.flatten(0, 1)).float(), dim=1).view(b, crops, -1).mean(1)
            else:
                scores = net(x).float()
        topk = scores.topk(k, dim=1).indices
        counts[0] += (topk[:, 0] == y).sum()
        counts[1] += (topk == y[:, None]).any(1).sum()
        counts[2] += y.numel()
    net.train(was_training)
    counts = placement.sum_over_replicas(counts).tolist()
    out = {"test_acc": counts[0] / max(counts[2], 1)}
    if num_classes >= 5:
        out["test_top5"] = counts[1] / max(counts[2], 1)
    return out


def train(cfg) -> dict:
    wall_start = time.perf_counter()
    out_dir = Path(cfg.train.output_dir)
    log_with = "wandb" if cfg.tracking.wandb else None
    accelerator = make_accelerator(cfg, log_with=log_with, project_dir=str(out_dir))
    placement = setup(cfg, accelerator)
    for notice in placement.notices:
        accelerator.print(f"distalex: {notice}")

    resume_path = checkpoint.resolve(cfg.train.resume, cfg.train.output_dir)
    state = checkpoint.read(resume_path) if resume_path else None
    if state is not None:
        checkpoint.check_architecture(state, placement.spec, resume_path)
    prepare_output_dir(cfg, resume_path, placement.is_main)
    data = build_data(cfg, placement.replica, placement.mesh.replicas, placement.device)

    model = placement.build_model(cfg.model.init, cfg.train.seed)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, foreach=cfg.optim.foreach)
    schedule = LRSchedule.from_config(cfg.optim)
    position, stats = Position(), EpochStats()
    # Dropout draws differ per rank; the data order does not depend on this RNG.
    torch.manual_seed(cfg.train.seed * 1000 + placement.rank + 1)
    if state is not None:
        rng_restored = checkpoint.restore(state, placement, model, optimizer, schedule, accelerator.scaler)
        position, stats = Position(**state["position"]), EpochStats(**state["stats"])
        accelerator.print(f"distalex: resumed from {resume_path} at step {position.step} "
                          f"(epoch {position.epoch}, batch {position.batch})"
                          + ("" if rng_restored else "; placement changed, RNG streams start afresh"))

    net = model                                   # unwrapped: evaluation, checkpoints
    model = placement.wrap(model, accelerator)
    optimizer = accelerator.prepare_optimizer(optimizer)
    step_model = torch.compile(model) if cfg.train.compile else model
    if cfg.train.cudnn_benchmark and placement.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    log = RunLog(cfg.train.output_dir, placement.is_main, accelerator)
    if state is not None:
        log.trim_after(position.step)
    device_name = torch.cuda.get_device_name(placement.device) if placement.device.type == "cuda" else "cpu"
    comm = placement.comm_bytes_per_step(net)
    run_info = {"split_mode": cfg.split_mode, "world_size": placement.mesh.world_size,
                "replicas": placement.mesh.replicas, "towers": cfg.model.towers,
                "tower_processes": placement.mesh.towers, "mixed_precision": cfg.train.mixed_precision,
                "global_batch": cfg.train.batch_size, "device": device_name}
    log.start_wandb(cfg, {**run_info, "config": to_container(cfg)},
                    run_name(cfg, placement.mesh.world_size, device_name))

    train_loader, test_loader = data.train, data.test
    eval_batch = (cfg.eval.batch_size or cfg.train.batch_size) // placement.mesh.replicas or 1
    steps_per_epoch = train_loader.batches_per_epoch
    max_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    last_row: dict = {}
    stopper = GracefulStop()
    progress = None
    if placement.is_main and cfg.train.progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=max_steps, initial=position.step, desc=cfg.experiment, dynamic_ncols=True)

    dev = placement.device
    sums = torch.tensor([stats.loss_sum, stats.correct, stats.seen], dtype=torch.float64, device=dev)
    interval = torch.zeros(2, dtype=torch.float64, device=dev)       # loss sum, steps
    bad_step = torch.full((), -1, dtype=torch.int64, device=dev)

    def save(pos: Position):
        check_finite()
        if placement.any_rank(not all(bool(torch.isfinite(p).all()) for p in net.parameters())):
            raise NonFiniteLoss(f"parameters are not finite after step {pos.step}; stopping. The last good "
                                f"checkpoint is kept in {checkpoint.checkpoint_dir(cfg.train.output_dir)}")
        stats.loss_sum, stats.correct, stats.seen = sums.tolist()
        saved = {**asdict(stats), "wall_before": stats.wall_before + time.perf_counter() - wall_start}
        return checkpoint.save(placement, model, optimizer, schedule, accelerator.scaler, asdict(pos),
                               saved, to_container(cfg), cfg.train.output_dir,
                               cfg.train.keep_checkpoints)

    def check_finite():
        bad = int(bad_step.item())
        if placement.any_rank(bad >= 0):
            raise NonFiniteLoss(f"loss is not finite at step {bad if bad >= 0 else '?'}; stopping. "
                                f"The last good checkpoint is kept in {checkpoint.checkpoint_dir(cfg.train.output_dir)}")

    try:
        done = position.step >= max_steps
        while not done and position.epoch < cfg.train.epochs:
            epoch = position.epoch
            if placement.tower_parallel:
                net.stats.pop()   # count training exchanges only, not evaluation's
            _sync(dev)
            t0 = time.perf_counter()
            for x, y in train_loader.epoch(epoch, position.batch):
                with accelerator.autocast():
                    logits = step_model(x)
                    loss = F.cross_entropy(logits, y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                position.step += 1
                position.batch += 1
                loss = loss.detach().double()
                sums += torch.stack([loss * y.numel(), (logits.argmax(1) == y).sum().double(),
                                     torch.tensor(float(y.numel()), dtype=torch.float64, device=dev)])
                interval += torch.stack([loss, torch.ones((), dtype=torch.float64, device=dev)])
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss),
                                       torch.tensor(position.step, device=dev), bad_step)
                if progress is not None:
                    progress.update(1)

                log_now = position.step % cfg.train.log_every == 0
                ckpt_now = bool(cfg.train.checkpoint_every) and position.step % cfg.train.checkpoint_every == 0
                stop_now = placement.any_rank(stopper.signum is not None)
                if log_now or ckpt_now or stop_now or position.step >= max_steps:
                    _sync(dev)
                    now = time.perf_counter()
                    stats.train_time += now - t0
                    if log_now:
                        check_finite()
                        loss_sum, n = placement.sum_over_replicas(interval.clone()).tolist()
                        last_row = {"step": position.step, "epoch": position.step / steps_per_epoch,
                                    "loss": loss_sum / n, "lr": schedule.lr,
                                    "examples_per_sec": _rate(stats, sums, placement)}
                        last_row.update(comm)
                        if placement.tower_parallel:
                            last_row["tower_bytes_per_step"] = net.stats.pop() // int(interval[1].item())
                        if dev.type == "cuda":
                            last_row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
                        log.log(last_row)
                        interval.zero_()
                    if ckpt_now or stop_now:
                        path = save(position)
                        if stop_now:
                            raise Interrupted(stopper.signum if stopper.signum else signal.SIGTERM, path)
                    t0 = time.perf_counter()
                if position.step >= max_steps:
                    done = True
                    break
            _sync(dev)
            stats.train_time += time.perf_counter() - t0
            check_finite()
            epoch_done = position.batch >= steps_per_epoch
            metrics = evaluate(net, test_loader, eval_batch, placement, accelerator, data.num_classes)
            loss_sum, correct, seen = placement.sum_over_replicas(sums.clone()).tolist()
            rate = _rate(stats, sums, placement)
            row = {"step": position.step, "epoch": position.step / steps_per_epoch,
                   "loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                   **metrics, "examples_per_sec": rate, "epoch_time_s": stats.train_time,
                   "lr": schedule.lr}
            log.log(row)
            last_row = row
            stats.train_examples += seen
            stats.train_time_total += stats.train_time
            if epoch_done:
                schedule.step_epoch(1.0 - metrics["test_acc"])
                schedule.apply(optimizer)
                position = Position(epoch=epoch + 1, batch=0, step=position.step)
                sums.zero_()
                stats.train_time = 0.0
            save(position)
        if "test_acc" not in last_row:   # resumed at max_steps: evaluate the weights as loaded
            last_row = {"step": position.step, "epoch": position.step / steps_per_epoch,
                        **evaluate(net, test_loader, eval_batch, placement, accelerator, data.num_classes)}
            log.log(last_row)
            save(position)
        stopper.restore()
    finally:
        if progress is not None:
            progress.close()

    wall = stats.wall_before + time.perf_counter() - wall_start
    summary = {k: last_row.get(k) for k in ("loss", "train_acc", "test_acc", "test_top5")
               if k in last_row}
    summary.update(run_info)
    summary.update({"examples_per_sec": stats.train_examples / max(stats.train_time_total, 1e-9),
                    "wall_time_s": wall, "steps": position.step, "epochs": position.step / steps_per_epoch,
                    "experiment": cfg.experiment, **comm})
    log.finish(summary)
    return summary


def _rate(stats: EpochStats, sums: torch.Tensor, placement: Placement) -> float:
    """Training examples/sec of this epoch (global examples; training steps only, as d2l)."""
    seen_local = float(sums[2].item())
    return seen_local * placement.mesh.replicas / max(stats.train_time, 1e-9)
