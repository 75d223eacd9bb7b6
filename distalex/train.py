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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from distalex import checkpoint
from distalex.config import to_container
from distalex.data import build_data
from distalex.meters import TrainMeter
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
class Totals:
    """Whole-run figures carried across resumes."""
    train_examples: float = 0.0    # of finished (or final partial) epochs
    train_time: float = 0.0
    wall_time: float = 0.0         # of earlier segments of the run (before a resume)


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


class Trainer:
    """One run: built from the config, then ``fit()``.  Each method does one thing."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.wall_start = time.perf_counter()
        self.accelerator = make_accelerator(cfg, log_with="wandb" if cfg.tracking.wandb else None,
                                            project_dir=cfg.train.output_dir)
        self.placement = setup(cfg, self.accelerator)
        for notice in self.placement.notices:
            self.accelerator.print(f"distalex: {notice}")
        # Everything that can refuse the run does so before anything is written.
        resume_path = checkpoint.resolve(cfg.train.resume, cfg.train.output_dir)
        state = checkpoint.read(resume_path) if resume_path else None
        if state is not None:
            checkpoint.check_architecture(state, self.placement.spec, resume_path)
        self.data = build_data(cfg, self.placement.replica, self.placement.mesh.replicas, self.placement.device)
        prepare_output_dir(cfg, resume_path, self.placement.is_main)

        self.net = self.placement.build_model(cfg.model.init, cfg.train.seed)   # unwrapped
        if cfg.train.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(self.net.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                    weight_decay=cfg.optim.weight_decay, foreach=cfg.optim.foreach)
        self.schedule = LRSchedule.from_config(cfg.optim)
        self.position, self.totals = Position(), Totals()
        # Dropout draws differ per rank; the data order does not use this RNG.
        torch.manual_seed(cfg.train.seed * 1000 + self.placement.rank + 1)
        meter_state = {}
        if state is not None:
            same = checkpoint.restore(state, self.placement, self.net, optimizer, self.schedule,
                                      self.accelerator.scaler)
            self.position = Position(**state["position"])
            self.totals = Totals(**state["stats"]["totals"])
            meter_state = state["stats"]["meter"]
            self.accelerator.print(f"distalex: resumed from {resume_path} at step {self.position.step} (epoch "
                                   f"{self.position.epoch}, batch {self.position.batch})"
                                   + ("" if same else "; placement changed, RNG streams start afresh"))
        self.meter = TrainMeter(self.placement, **meter_state)
        self.model = self.placement.wrap(self.net, self.accelerator)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.step_model = torch.compile(self.model) if cfg.train.compile else self.model
        if cfg.train.cudnn_benchmark and self.placement.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        self.steps_per_epoch = self.data.train.batches_per_epoch
        self.max_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.eval_batch = max(1, (cfg.eval.batch_size or cfg.train.batch_size) // self.placement.mesh.replicas)
        self.comm = self.placement.comm_bytes_per_step(self.net)
        self.log = RunLog(cfg.train.output_dir, self.placement.is_main, self.accelerator, plots=cfg.tracking.plots)
        if state is not None:
            self.log.trim_after(self.position.step)
        self.run_info = self._run_info()
        self.log.start_wandb(cfg, {**self.run_info, "config": to_container(cfg)},
                             run_name(cfg, self.placement.mesh.world_size, self.run_info["device"]))
        self.last_eval: dict = {}

    def _run_info(self) -> dict:
        p, cfg = self.placement, self.cfg
        device = torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else "cpu"
        return {"split_mode": cfg.split_mode, "world_size": p.mesh.world_size, "replicas": p.mesh.replicas,
                "towers": cfg.model.towers, "tower_processes": p.mesh.towers,
                "mixed_precision": cfg.train.mixed_precision, "global_batch": cfg.train.batch_size,
                "device": device}

    # -- the loop ---------------------------------------------------------------------
    def fit(self) -> dict:
        stopper = GracefulStop()
        progress = self._progress_bar()
        try:
            while self.position.step < self.max_steps and self.position.epoch < self.cfg.train.epochs:
                self.train_epoch(stopper, progress)
                self.end_epoch()
            if not self.last_eval:        # resumed at the end: evaluate the weights as loaded
                self.last_eval = {"step": self.position.step, "epoch": self._epoch_float(), **self.evaluate()}
                self.log.log(self.last_eval)
                self.save()
        finally:
            stopper.restore()
            if progress is not None:
                progress.close()
        return self.finish()

    def train_epoch(self, stopper: GracefulStop, progress) -> None:
        cfg, pos = self.cfg.train, self.position
        if self.placement.tower_parallel:
            self.net.stats.pop()          # count training exchanges only, not evaluation's
        self.meter.start_clock()
        for x, y in self.data.train.epoch(pos.epoch, pos.batch):
            self.train_step(x, y)
            pos.step += 1
            pos.batch += 1
            if progress is not None:
                progress.update(1)
            log_now = pos.step % cfg.log_every == 0
            ckpt_now = bool(cfg.checkpoint_every) and pos.step % cfg.checkpoint_every == 0
            stop_now = self.placement.any_rank(stopper.signum is not None)
            last = pos.step >= self.max_steps
            if log_now or ckpt_now or stop_now:
                self.meter.stop_clock()
                if log_now:
                    self.log_step()
                if ckpt_now or stop_now:
                    path = self.save()
                    if stop_now:
                        raise Interrupted(stopper.signum or signal.SIGTERM, path)
                self.meter.start_clock()
            if last:
                break
        self.meter.stop_clock()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.accelerator.autocast():
            logits = self.step_model(x)
            loss = F.cross_entropy(logits, y)
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.update(loss, logits, y, self.position.step + 1)

    # -- what happens between steps -----------------------------------------------------
    def log_step(self) -> None:
        self.check_finite()
        steps = int(self.meter.interval[1].item())
        row = {"step": self.position.step, "epoch": self._epoch_float(), "loss": self.meter.interval_loss(),
               "lr": self.schedule.lr, "examples_per_sec": self.meter.examples_per_sec(), **self.comm}
        if self.placement.tower_parallel:
            sent = self.net.stats.pop() // max(steps, 1)
            if sent:           # not counted under torch.compile
                row["tower_bytes_per_step"] = self.comm["tower_bytes_per_step"] = sent
        if self.placement.device.type == "cuda":
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.placement.device)
        self.log.log(row)

    def end_epoch(self) -> None:
        """Evaluate, log the epoch row, step the LR schedule, checkpoint."""
        self.check_finite()
        figures = self.meter.epoch_figures()
        seen = figures.pop("seen")
        self.last_eval = {"step": self.position.step, "epoch": self._epoch_float(), **figures,
                          **self.evaluate(), "epoch_time_s": self.meter.train_time, "lr": self.schedule.lr}
        self.log.log(self.last_eval)
        self.totals.train_examples += seen
        self.totals.train_time += self.meter.train_time
        if self.position.batch >= self.steps_per_epoch:       # a whole epoch, not a max_steps stop
            self.schedule.step_epoch(1.0 - self.last_eval["test_acc"])
            self.schedule.apply(self.optimizer)
            self.position = Position(epoch=self.position.epoch + 1, batch=0, step=self.position.step)
            self.meter.new_epoch()
        self.save()

    def evaluate(self) -> dict:
        return evaluate(self.net, self.data.test, self.eval_batch, self.placement, self.accelerator,
                        self.data.num_classes)

    def check_finite(self) -> None:
        bad = self.meter.first_bad_step()
        if bad >= 0:
            raise NonFiniteLoss(f"loss is not finite at step {bad}; stopping. The last good checkpoint "
                                f"is kept in {checkpoint.checkpoint_dir(self.cfg.train.output_dir)}")

    def save(self):
        """Checkpoint (a collective); never one with non-finite weights."""
        self.check_finite()
        finite = all(bool(torch.isfinite(p).all()) for p in self.net.parameters())
        if self.placement.any_rank(not finite):
            raise NonFiniteLoss(f"parameters are not finite after step {self.position.step}; stopping. The "
                                f"last good checkpoint is kept in {checkpoint.checkpoint_dir(self.cfg.train.output_dir)}")
        totals = {**asdict(self.totals), "wall_time": self._wall_time()}
        return checkpoint.save(self.placement, self.model, self.optimizer, self.schedule, self.accelerator.scaler,
                               asdict(self.position), {"meter": self.meter.state(), "totals": totals},
                               to_container(self.cfg), self.cfg.train.output_dir, self.cfg.train.keep_checkpoints)

    def finish(self) -> dict:
        summary = {k: self.last_eval[k] for k in ("loss", "train_acc", "test_acc", "test_top5")
                   if k in self.last_eval}
        summary.update(self.run_info)
        summary.update({"examples_per_sec": self.totals.train_examples / max(self.totals.train_time, 1e-9),
                        "wall_time_s": self._wall_time(), "steps": self.position.step,
                        "epochs": self._epoch_float(), "experiment": self.cfg.experiment, **self.comm})
        self.log.finish(summary)
        return summary

    # -- small helpers ------------------------------------------------------------------
    def _epoch_float(self) -> float:
        return self.position.epoch + self.position.batch / self.steps_per_epoch

    def _wall_time(self) -> float:
        return self.totals.wall_time + time.perf_counter() - self.wall_start

    def _progress_bar(self):
        if not (self.placement.is_main and self.cfg.train.progress):
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.max_steps, initial=self.position.step, desc=self.cfg.experiment, dynamic_ncols=True)


def train(cfg) -> dict:
    return Trainer(cfg).fit()
