"""The training loop: step, evaluate, log, checkpoint.  Helpers do the work.

The placement (distalex/parallel/placement.py) decides where every tensor lives
and runs forward and backward; the loop is the same for every split mode.
Figures that need a host sync (loss, accuracy, NaN checks) are accumulated on
the device and read only at log intervals, epoch ends and checkpoints.

A batch flows: data loader (this replica's slice of the global batch, on the
device) -> the placed model (towers exchange inside its forward/backward, DDP
all-reduces inside backward) -> optimizer step -> meter (device-side sums) ->
at log intervals a metrics row, at epoch ends an evaluation, a metrics row and
a checkpoint.
"""

from __future__ import annotations

import signal
import time

import torch

from distalex.config import to_container
from distalex.errors import Interrupted, NonFiniteLoss
from distalex.runtime import precision
from distalex.runtime.signals import GracefulStop
from distalex.training import checkpoint
from distalex.training.build import Run, build_run, progress_bar
from distalex.training.evaluate import evaluate_accuracy
from distalex.training.state import Position

MEMORY_KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes")


class Trainer:
    """The loop over a built :class:`~distalex.training.build.Run`: step, log, evaluate,
    checkpoint.  Each method does one thing; none branches on the split mode."""

    def __init__(self, run: Run):
        self.run = run
        self.cfg = run.cfg
        self.accelerator, self.placement, self.state = run.accelerator, run.placement, run.state
        self.data, self.log, self.profiler = run.data, run.log, run.profiler
        self.max_steps, self.steps_per_epoch = run.max_steps, run.steps_per_epoch
        self.memory: dict = {}  # bytes this process held at the newest logged step (MEMORY_KEYS)

    def close(self) -> None:
        """Give the output dir back (see :meth:`Run.close`)."""
        self.run.close()

    # -- the loop ---------------------------------------------------------------------
    def fit(self) -> dict:
        bar = progress_bar(
            self.cfg.train, self.cfg.experiment, self.placement, self.max_steps, self.state.position.step
        )
        with GracefulStop() as stop, bar as progress, self.profiler:
            # Until no step is left and the last one is evaluated (a run resumed after its
            # last step but before its last evaluation does only that evaluation).
            while self._steps_left() or self.run.last_eval.get("step") != self.state.position.step:
                self.train_epoch(stop, progress)
                self.end_epoch()
        if self.run.checkpointed_step != self.state.position.step:
            self.save()
        return self.finish()

    def _steps_left(self) -> bool:
        p = self.state.position
        return p.step < self.max_steps and p.epoch < self.cfg.train.epochs

    def train_epoch(self, stop: GracefulStop, progress) -> None:
        cfg, pos, meter = self.cfg.train, self.state.position, self.state.meter
        if not self._steps_left():
            return
        meter.start_clock()
        for x, y in self.data.train.epoch(pos.epoch, pos.batch):
            self.train_step(x, y)
            self.profiler.after_step()
            pos.step += 1
            pos.batch += 1
            progress.update(1)
            log_now = pos.step % cfg.log_every == 0
            ckpt_now = bool(cfg.checkpoint_every) and pos.step % cfg.checkpoint_every == 0
            # Every rank asks at the same steps, so all stop after the same step.
            stop_now = pos.step % cfg.stop_check_every == 0 and self.placement.any_rank(stop.requested)
            if log_now or ckpt_now or stop_now:
                meter.stop_clock()
                if log_now:
                    self.log_step()
                if ckpt_now or stop_now:
                    path = self.save()
                    if stop_now:
                        raise Interrupted(stop.signum or signal.SIGTERM, path)
                meter.start_clock()
            if pos.step >= self.max_steps:
                break
        meter.stop_clock()
        self.profiler.end_epoch()  # evaluation and checkpoints are not training steps

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss, logits = self.placement.forward_backward(
            self.run.model, x, y, self.state.position.step, self.accelerator.autocast, self.accelerator.backward
        )
        precision.optimizer_step(self.state.optimizer, self.state.scaler)  # fp16: one skip decision for all ranks
        if (self.state.position.step + 1) % self.cfg.train.log_every == 0:  # a logged step: its gradients still held
            self.memory = self.placement.memory_bytes(self.state.model, self.state.optimizer)
        self.state.optimizer.zero_grad(set_to_none=True)
        self.state.meter.update(loss, logits, y, self.state.position.step + 1)

    # -- what happens between steps -----------------------------------------------------
    def log_step(self) -> None:
        self.check_finite()
        interval = self.state.meter.read_interval()
        row = {
            "step": self.state.position.step,
            "epoch": self._epoch_float(),
            "loss": interval.loss,
            "lr": self.state.schedule.lr,
            **self._speed(self.state.meter.examples_per_sec(interval.seen)),
            **self.placement.comm_bytes_per_step(interval.steps),
            **self.memory,
        }
        if self.placement.device.type == "cuda":
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.placement.device)
        self.log.log(row)

    def end_epoch(self) -> None:
        """Evaluate, log the epoch row, step the LR schedule, checkpoint."""
        self.check_finite()
        s = self.state
        figures = s.meter.read_epoch()
        self.run.last_eval = {
            "step": s.position.step,
            "epoch": self._epoch_float(),
            "loss": figures.loss,
            "train_acc": figures.train_acc,
            **self._speed(figures.examples_per_sec),
            **self.evaluate(),
            "epoch_time_s": s.meter.train_time,
            "lr": s.schedule.lr,
        }
        self.log.log(self.run.last_eval)
        if s.position.batch >= self.steps_per_epoch:  # a whole epoch, not a max_steps stop
            s.totals.train_examples += figures.seen
            s.totals.train_time += s.meter.train_time
            s.schedule.step_epoch(1.0 - self.run.last_eval["test_acc"])
            s.schedule.apply(s.optimizer)
            s.position = Position(epoch=s.position.epoch + 1, batch=0, step=s.position.step)
            s.meter.new_epoch()
        self.save()

    def evaluate(self) -> dict:
        figures = evaluate_accuracy(
            self.placement.inference_model(self.state.model),
            self.data.test,
            self.run.eval_batch,
            self.placement,
            self.accelerator.autocast,
            self.data.num_classes,
        )
        # Step rows count training exchanges only, not evaluation's.  Dropped here rather than
        # when the next epoch starts: a resumed run starts with the bytes its checkpoint carries.
        self.placement.discard_comm()
        return figures

    def check_finite(self) -> None:
        bad = self.state.meter.first_bad_step()
        if bad >= 0:
            raise NonFiniteLoss(
                f"loss is not finite at step {bad}; stopping. {checkpoint.kept(self.cfg.train.output_dir)}"
            )

    def save(self):
        """Checkpoint (a collective); never one with non-finite weights."""
        self.check_finite()
        if self.placement.any_rank(not self.placement.all_finite(self.state.model)):
            raise NonFiniteLoss(
                f"parameters are not finite after step {self.state.position.step}; stopping. "
                f"{checkpoint.kept(self.cfg.train.output_dir)}"
            )
        self.state.totals.wall_time = self._wall_time()
        self.run.started = time.perf_counter()
        self.run.checkpointed_step = self.state.position.step
        return checkpoint.save(
            self.placement,
            self.state,
            to_container(self.cfg),
            self.cfg.train.output_dir,
            self.cfg.train.keep_checkpoints,
            last_eval=self.run.last_eval,
            classes=self.data.classes,
        )

    def finish(self) -> dict:
        s = self.state
        summary = {
            k: self.run.last_eval[k] for k in ("loss", "train_acc", "test_acc", "test_top5") if k in self.run.last_eval
        }
        summary.update(self.run.run_info)
        # Finished epochs plus the epoch a max_steps stop cut short (all from the checkpoint on resume).
        examples = s.totals.train_examples + s.meter.read_epoch().seen
        train_time = s.totals.train_time + s.meter.train_time
        summary.update(
            {
                **self._speed(examples / max(train_time, 1e-9)),
                "train_examples": examples,
                "train_time_s": train_time,
                "wall_time_s": self._wall_time(),
                "steps": s.position.step,
                "epochs": self._epoch_float(),
                "experiment": self.cfg.experiment,
                **self.placement.comm_summary(),
                # The newest logged step's (a run resumed after its last step finds them in its records).
                **(self.memory or self.log.latest(MEMORY_KEYS)),
            }
        )
        self.log.finish(summary)
        return summary

    # -- small helpers ------------------------------------------------------------------
    def _speed(self, examples_per_sec: float) -> dict:
        """examples/sec with the model TFLOP/s and MFU it stands for."""
        return {"examples_per_sec": examples_per_sec, **self.run.utilization.figures(examples_per_sec)}

    def _epoch_float(self) -> float:
        p = self.state.position
        return p.epoch + p.batch / self.steps_per_epoch

    def _wall_time(self) -> float:
        """Wall time of the whole run: earlier segments (before a resume) plus this one."""
        return self.state.totals.wall_time + time.perf_counter() - self.run.started


def train(cfg) -> dict:
    """Train the run ``cfg`` describes to its end; its summary."""
    run = build_run(cfg)
    try:
        return Trainer(run).fit()
    finally:
        run.close()
