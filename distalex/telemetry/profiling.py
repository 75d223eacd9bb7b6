"""``train.profile=N``: record N steady training steps and say where their time went.

After two warm-up steps (oneDNN/cuDNN pick and cache their kernels in the
first ones) :class:`StepProfiler` records N training steps with
``torch.profiler`` and writes, under ``<output_dir>/profile/``:

* ``trace.json`` (rank 0; ``trace_rank<r>.json`` for the others): the Chrome
  trace, which Perfetto (ui.perfetto.dev) and chrome://tracing open;
* ``summary.json``: milliseconds per step by category, one entry per process;
* ``profile.png``: one stacked bar per process (:func:`distalex.telemetry.plots.plot_profile`).

Each process classifies its own main thread's wall time; rank 0 gathers the
results (as JSON over the gloo control group) and writes the summary and the
picture.  The categories come from ``record_function`` labels with a prefix:

* ``compute:<group>`` -- the model's layers, grouped by the convolution or
  fully connected layer they follow (conv1 = conv1, relu1, lrn1, pool1; ...).
  The labels are put on the model's child modules by hooks that exist only
  while profiling; the reference model itself knows nothing of them.  The
  backward pass is matched to these groups by the autograd sequence number
  each backward node shares with the forward op that made it.
* ``comm:<what>`` -- communication: ``comm:tower`` (the tower exchanges of
  :mod:`distalex.parallel.towers`), ``comm:hybrid`` (the feature and fc exchanges of
  :mod:`distalex.parallel.hybrid`), ``comm:pipeline`` (the stage boundaries' point-to-point
  sends and receives and the step figures' broadcast, :mod:`distalex.parallel.pipeline`), ``comm:ddp`` (DDP's gradient all-reduce: the
  reducer's work during backward and the wait for its last buckets at the end
  of backward), ``comm:other`` (any other collective, e.g. the per-step stop
  flag).  A new exchange joins by opening ``record_function("comm:<name>")``
  around its collectives, forward and backward.
* ``data:<stage>`` -- gathering and resizing the batch (or loading it).
* ``optimizer`` -- PyTorch's own ``Optimizer.step``/``zero_grad`` labels;
  the loss (``aten::cross_entropy_loss`` and its backward) is ``loss``.

Everything else on the main thread is ``other`` (Python, the autograd engine,
bookkeeping between steps).  Communication that overlaps computation on another
thread (gloo's all-reduce of DDP's earlier buckets) is not on the main thread's
critical path and shows only as the compute it slowed down.  On a GPU the
categories hold the device (kernel) time of the ops; ``other`` is then the
rest of the step's wall time (launch overhead, idle device).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd.profiler import record_function

from distalex.parallel.pipeline import PROFILE_LABEL as PIPELINE_LABEL
from distalex.parallel.placement import BACKWARD  # the label around the backward pass
from distalex.runtime.io import write_json

WARMUP_STEPS = 2
TOP_OPS = 25  # the ops with the most self time, listed in summary.json
# The groups of the stacked bars, in order (comm:* groups are open-ended and follow fc8).
LAYER_GROUPS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
ORDER = ("data", *LAYER_GROUPS, "loss", "optimizer")
STEP = "profiled_step#"  # the label around each recorded step (from one step's end to the next's)


def layer_group(name: str, current: str | None) -> str | None:
    """The group a child module of the model belongs to: its own name for conv/fc layers,
    else the group of the conv/fc layer before it."""
    return name if name in LAYER_GROUPS else current


class _ModuleLabels:
    """Forward hooks that open ``record_function('compute:<group>')`` around each child module."""

    def __init__(self, model: torch.nn.Module):
        self.handles = []
        group = None
        for name, child in model.named_children():
            group = layer_group(name, group)
            if group is None:
                continue
            label = f"compute:{group}"
            self.handles.append(child.register_forward_pre_hook(self._enter(label)))
            self.handles.append(child.register_forward_hook(self._exit))
        self._open: list = []

    def _enter(self, label: str):
        def hook(module, args):
            rf = record_function(label)
            rf.__enter__()
            self._open.append(rf)

        return hook

    def _exit(self, module, args, output):
        if self._open:
            self._open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        while self._open:
            self._open.pop().__exit__(None, None, None)


def _own_category(event, seq_category: dict, ddp: bool) -> str | None:
    """The category an event names itself (None: it inherits its parent's)."""
    name = event.name
    if name.startswith("compute:"):
        return name[len("compute:") :]
    if name.startswith(("comm:", "data:")):
        return name if name.startswith("comm:") else "data"
    if name.startswith("FSDP::"):  # FSDP2's own labels: its all-gathers, reduce-scatters and their copies
        return "comm:fsdp"
    if name.startswith("Optimizer."):
        return "optimizer"
    if name == "aten::cross_entropy_loss":
        return "loss"
    if name.startswith("autograd::engine::evaluate_function:") and event.sequence_nr >= 0:
        return seq_category.get(event.sequence_nr)
    if name == BACKWARD:
        # What backward does outside its nodes: the engine's bookkeeping, and under DDP
        # the reducer's wait for the all-reduce of the last buckets.
        return "comm:ddp" if ddp else "other"
    return None


def _collective_category(name: str, ddp_backward: bool) -> str:
    """Point-to-point sends and receives are the pipeline's stage boundaries (the schedules of
    distalex/parallel/pipeline.py post them outside any label of ours); DDP's in backward."""
    if "send" in name or "recv" in name:
        return PIPELINE_LABEL
    return "comm:ddp" if ddp_backward else "comm:other"


def _is_collective(name: str) -> bool:
    return name.startswith(("c10d::", "gloo:", "nccl:", "record_param_comms")) or "reducer::" in name


def classify(steps: list, ddp: bool = False, device_time: bool = False, ops: dict | None = None) -> dict[str, float]:
    """Microseconds per category, summed over the profiled ``steps`` (the step events).

    CPU: each event's self time (its span less its children's) goes to the
    innermost labelled category around it.  ``device_time``: the events'
    self device time instead, and ``other`` = wall time less all of it.  ``ops``, when
    given, receives the same time by (category, op name).
    """
    seq_category: dict[int, str] = {}

    def label_forward(ev, category):
        if ev.name.startswith(("compute:", "comm:")) or ev.name == "aten::cross_entropy_loss":
            category = _own_category(ev, {}, ddp)
        if category and ev.sequence_nr >= 0 and not ev.name.startswith("autograd::"):
            seq_category.setdefault(ev.sequence_nr, category)
        for child in ev.cpu_children:
            label_forward(child, category)

    for step in steps:
        label_forward(step, None)

    out: dict[str, float] = defaultdict(float)

    def walk(ev, inherited, in_backward):
        own = _own_category(ev, seq_category, ddp)
        if own is None and _is_collective(ev.name) and not (inherited or "").startswith("comm:"):
            own = _collective_category(ev.name, ddp and in_backward)
        category = own or inherited
        if device_time:
            spent = ev.self_device_time_total
        else:
            spent = max(0.0, ev.time_range.elapsed_us() - sum(c.time_range.elapsed_us() for c in ev.cpu_children))
        out[category or "other"] += spent
        if ops is not None:
            key = (category or "other", ev.name)
            ops[key] = ops.get(key, 0.0) + spent
        if ev.name == BACKWARD:  # its own category is for its self time only
            category, in_backward = None, True
        for child in ev.cpu_children:
            walk(child, category, in_backward)

    for step in steps:
        walk(step, None, False)
    if device_time:
        wall = sum(s.time_range.elapsed_us() for s in steps)
        out["other"] = max(0.0, wall - sum(v for k, v in out.items() if k != "other"))
    return dict(out)


def ordered(categories) -> list[str]:
    """Categories in plotting order: data, layers, loss, optimizer, comm:*, other."""
    cats = set(categories)
    head = [c for c in ORDER if c in cats]
    comm = sorted(c for c in cats if c.startswith("comm:"))
    rest = sorted(cats - set(head) - set(comm) - {"other"})
    return head + comm + rest + (["other"] if "other" in cats else [])


def step_events(prof) -> list:
    """The top-level step events of the profiled (main) thread."""
    return [e for e in prof.events() if e.name.startswith(STEP) and e.cpu_parent is None]


class StepProfiler:
    """Records ``steps`` training steps after :data:`WARMUP_STEPS`; a no-op when ``steps`` is 0.

    The loop calls :meth:`after_step` after every optimizer step and :meth:`close` at the end.
    """

    def __init__(self, steps: int, model: torch.nn.Module, placement, output_dir, title: str = ""):
        self.steps, self.model, self.placement = steps, model, placement
        self.dir = Path(output_dir) / "profile"
        self.title = title
        self.seen = 0  # training steps since this process started
        self.recorded = 0
        self.prof = None
        self.labels = None
        self._step = None  # the open record_function of the step being recorded
        self.done = steps <= 0

    def after_step(self) -> None:
        if self.done:
            return
        self.seen += 1
        if self.prof is None:
            if self.seen >= WARMUP_STEPS:
                self._start()
            return
        self._sync()
        self._close_step()
        self.recorded += 1
        if self.recorded >= self.steps:
            self._finish()
        else:
            self._open_step()

    def end_epoch(self) -> None:
        """The epoch ended (evaluation and a checkpoint follow, which are not training steps):
        a profile in progress ends here with the steps it has."""
        if self.done or self.prof is None:
            return
        if self.recorded == 0:  # started after the epoch's last step: start again in the next epoch
            self._stop()
            self.prof = None
            return
        self._report_short("the epoch")
        self._finish()

    def close(self, failed: bool = False) -> None:
        """End of training: write what was recorded; after a failure only stop (no collectives)."""
        if self.done:
            return
        if self.prof is not None and self.recorded > 0 and not failed:
            self._report_short("the run")
            self._finish()
            return
        self._stop()
        self.done = True

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    # -- inside ---------------------------------------------------------------------
    def _report_short(self, what: str) -> None:
        if self.placement.is_main:
            print(
                f"distalex: profile: {what} ended after {self.recorded} of {self.steps} profiled steps",
                file=sys.stderr,
                flush=True,
            )

    def _sync(self) -> None:
        if self.placement.device.type == "cuda":
            torch.cuda.synchronize(self.placement.device)

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.placement.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.labels = _ModuleLabels(self.model)
        self._sync()
        self.prof = profile(activities=activities)
        self.prof.start()
        self._open_step()

    def _open_step(self) -> None:
        self._step = record_function(f"{STEP}{self.recorded}")
        self._step.__enter__()

    def _close_step(self) -> None:
        if self._step is not None:
            self._step.__exit__(None, None, None)
            self._step = None

    def _stop(self) -> None:
        self._close_step()
        if self.prof is not None:
            self._sync()
            self.prof.stop()
        if self.labels is not None:
            self.labels.remove()
            self.labels = None

    def _finish(self) -> None:
        self._stop()
        self.done = True
        rank = self.placement.rank
        # Only whole steps: one opened after the last step (before an early end) holds no step.
        steps = [e for e in step_events(self.prof) if int(e.name[len(STEP) :]) < self.recorded]
        device_time = self.placement.device.type == "cuda"
        ops: dict = {}
        totals = classify(steps, ddp=self.placement.uses_ddp, device_time=device_time, ops=ops)
        n = max(len(steps), 1)
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:TOP_OPS]
        mine = {
            "rank": rank,
            "replica": self.placement.replica,
            "tower": self.placement.tower,
            "steps": len(steps),
            "step_ms": sum(s.time_range.elapsed_us() for s in steps) / n / 1000,
            "ms_per_step": {k: round(totals[k] / n / 1000, 4) for k in ordered(totals)},
            "top_ops": [[cat, name, round(us / n / 1000, 4)] for (cat, name), us in top],
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / ("trace.json" if rank == 0 else f"trace_rank{rank}.json")
        self.prof.export_chrome_trace(str(trace))
        ranks = gather_json(mine, self.placement)
        self.prof = None
        if not self.placement.is_main:
            return
        summary = {
            "steps": len(steps),
            "warmup_steps": WARMUP_STEPS,
            "measure": "device time per category" if device_time else "main-thread wall time per category",
            "device": str(self.placement.device),
            "ranks": ranks,
        }
        write_json(self.dir / "summary.json", summary)
        try:
            from distalex.telemetry.plots import plot_profile

            title = (
                f"{self.title or 'training'}: {len(steps)} profiled steps, ms per step on each process's main thread"
            )
            plot_profile([(_rank_label(r, self.placement), r) for r in ranks], self.dir / "profile.png", title)
        except Exception as exc:  # a picture must never stop training
            print(f"warning: profile.png not written ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
        print(f"distalex: profile of {len(steps)} steps -> {self.dir}", flush=True)


def _rank_label(r: dict, placement) -> str:
    label = f"rank {r['rank']}"
    if placement.mesh.tower_ranks > 1:
        label += f" (replica {r['replica']}, tower {r['tower']})"
    return label


def gather_json(obj, placement) -> list:
    """Every rank's ``obj`` (JSON-serialisable), in rank order, on every rank: bytes over the
    gloo control group, so no rank ever unpickles another's data."""
    if placement.mesh.world_size == 1:
        return [obj]
    import torch.distributed as dist

    group = placement.control_group
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(placement.mesh.world_size)]
    dist.all_gather(sizes, torch.tensor([data.numel()]), group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: data.numel()] = data
    parts = [torch.zeros(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return [json.loads(bytes(p[: int(s)].tolist()).decode()) for p, s in zip(parts, sizes, strict=True)]
