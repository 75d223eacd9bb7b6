"""Typed experiment config: dataclasses -> OmegaConf, loaded and validated once.

Order of precedence: schema defaults < YAML file < ``--split-mode`` < ``key=value``
dot-list overrides.  Every problem is reported as one :class:`ConfigError` line
that names the key; the CLI turns it into exit status 2.  After
:func:`load_config` returns, the config is read-only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distalex.errors import ConfigError

SPLIT_MODES = ("single", "ddp", "model-parallel")
DATASETS = ("fashion_mnist", "synthetic", "imagefolder")
PRECISIONS = ("no", "bf16", "fp16")
# YAML 1.1 reads a bare `no` as a boolean; OmegaConf then stores "False".
_PRECISION_SPELLINGS = {"False": "no", "false": "no", "fp32": "no"}
SCHEDULES = ("constant", "plateau")
COMM_HOOKS = ("none", "bf16", "fp16", "powersgd")
INITS = ("xavier", "paper")


@dataclass
class ModelConfig:
    # Towers of the paper's layout (§3.5).  Unset: 2 (the paper's) for
    # model-parallel, 1 (the seed's single net) for single and ddp.
    towers: Optional[int] = None
    width: float = 1.0  # channel/unit multiplier, 1.0 = the paper's widths
    dropout: float = 0.5
    lrn: bool = False  # per-tower LRN after conv1/conv2 (paper §3.3)
    in_channels: int = 1
    num_classes: int = 10
    conv1_padding: int = 1  # the seed pads 1; the paper's 55x55 maps need 2 at 224
    init: str = "xavier"  # "xavier" (d2l) or "paper" (N(0, 0.01), biases 1 in conv2/4/5, fc6/7)


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: Optional[str] = None
    image_size: int = 224
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    synthetic_train_size: int = 2048
    synthetic_test_size: int = 512
    num_workers: int = 4  # DataLoader workers (imagefolder only)
    resize_size: int = 256  # imagefolder: shorter side before the crop (paper §2)
    pca_sigma: float = 0.1  # imagefolder: PCA lighting noise (paper §4.1)


@dataclass
class EvalConfig:
    ten_crop: bool = False  # imagefolder: average softmax over 10 crops (paper §4.1)
    batch_size: Optional[int] = None  # global eval batch; unset = train.batch_size


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: Optional[int] = None
    batch_size: int = 128  # the GLOBAL batch of one optimizer step
    seed: int = 0
    output_dir: str = "runs/d2l_fashion_mnist"
    log_every: int = 50
    checkpoint_every: Optional[int] = None  # steps; a checkpoint is also written every epoch
    keep_checkpoints: int = 3
    resume: Optional[str] = None  # "auto" or a checkpoint path
    overwrite: bool = False
    # auto | no | bf16 | fp16 (fp16 on GPU only).  "auto": a bf16 or fp16 that
    # `accelerate launch --mixed_precision` chose, else bf16 where the device
    # computes it natively (measured 1.9x on AVX512-BF16 CPUs, same accuracy;
    # tensor cores on GPUs), else no (fp32).
    mixed_precision: str = "auto"
    channels_last: bool = True  # measured 1.16x with bf16 on CPU; a layout change only
    # CPU: keep freed memory in the process instead of page-faulting it back every
    # step (distalex/hostmem.py); no effect on the arithmetic.
    reuse_host_memory: bool = True
    compile: bool = False
    cudnn_benchmark: bool = True
    timeout_s: int = 300  # process-group timeout: a dead rank ends the job
    progress: bool = True
    # Record this many training steps (after 2 warm-up steps) with torch.profiler:
    # <output_dir>/profile/{trace.json,summary.json,profile.png}.  0 = off.
    profile: int = 0
    # Peak TFLOP/s of one device (one process on a CPU) for MFU; unset = the
    # datasheet table for GPUs, a measured matmul peak for CPUs (distalex/peak.py).
    peak_tflops: Optional[float] = None


@dataclass
class OptimConfig:
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    foreach: bool = True
    schedule: str = "constant"  # constant (d2l) | plateau (paper: /10 when val error stalls)
    plateau_factor: float = 0.1
    plateau_patience: int = 1
    min_lr: float = 0.0


@dataclass
class DDPConfig:
    """How DDP replicas exchange gradients (PyTorch's DDP communication hooks)."""

    # none: fp32 all-reduce, exact.  bf16 / fp16: gradients rounded to 16 bits for
    # the all-reduce (half the bytes).  powersgd: low-rank compression with error
    # feedback (Vogels et al. 2019); exact until powersgd_start_iter.
    comm_hook: str = "none"
    bucket_cap_mb: Optional[float] = None  # unset: DDP's default (25 MiB buckets, a 1 MiB first one)
    gradient_as_bucket_view: bool = False  # gradients alias the buckets: one copy less, less memory
    powersgd_rank: int = 1  # matrix approximation rank
    powersgd_start_iter: int = 1000  # plain all-reduce before this step (PyTorch's default)


@dataclass
class TrackingConfig:
    wandb: bool = True
    project: str = "distalex"
    group: Optional[str] = None
    run_name: Optional[str] = None
    plots: bool = True


@dataclass
class Config:
    experiment: str = "d2l_fashion_mnist"
    split_mode: str = "single"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


def load_config(
    path: Optional[str] = None, overrides: Optional[List[str]] = None, split_mode: Optional[str] = None
) -> DictConfig:
    """Merge schema, YAML, split mode and overrides; validate; return read-only."""
    cfg = OmegaConf.structured(Config)
    try:
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file '{path}' does not exist")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if split_mode is not None:
            cfg.split_mode = split_mode
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value")
            key = item.split("=", 1)[0]
            if OmegaConf.select(cfg, key, default=MISSING) is MISSING and not _is_optional_none(cfg, key):
                raise ConfigError(f"config key '{key}' is unknown")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    cfg.train.mixed_precision = resolve_precision(cfg.train.mixed_precision)
    if cfg.model.towers is None:
        cfg.model.towers = 2 if cfg.split_mode == "model-parallel" else 1
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def resolve_precision(value: str) -> str:
    """The precision "auto" stands for on this machine (see TrainConfig)."""
    value = _PRECISION_SPELLINGS.get(value, value)
    if value != "auto":
        return value
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher in ("bf16", "fp16"):
        return launcher
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


def _is_optional_none(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {problem}")


def validate(cfg: DictConfig) -> None:
    """Value checks that the types alone cannot express. World-size checks live in parallel.py."""
    _require(cfg.split_mode in SPLIT_MODES, "split_mode", f"must be one of {SPLIT_MODES}, got '{cfg.split_mode}'")
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    _require(m.towers >= 1, "model.towers", f"must be >= 1, got {m.towers}")
    _require(m.width > 0, "model.width", f"must be > 0, got {m.width}")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(m.in_channels >= 1, "model.in_channels", f"must be >= 1, got {m.in_channels}")
    _require(m.num_classes >= 2, "model.num_classes", f"must be >= 2, got {m.num_classes}")
    _require(m.init in INITS, "model.init", f"must be one of {INITS}, got '{m.init}'")
    _require(d.name in DATASETS, "data.name", f"must be one of {DATASETS}, got '{d.name}'")
    _require(d.image_size >= 1, "data.image_size", f"must be >= 1, got {d.image_size}")
    for key in ("train_limit", "test_limit"):
        val = d[key]
        _require(val is None or val >= 1, f"data.{key}", f"must be >= 1 or unset, got {val}")
    _require(d.synthetic_train_size >= 1, "data.synthetic_train_size", "must be >= 1")
    _require(d.synthetic_test_size >= 1, "data.synthetic_test_size", "must be >= 1")
    _require(d.pca_sigma >= 0, "data.pca_sigma", f"must be >= 0, got {d.pca_sigma}")
    _require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _require(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", f"must be >= 1 or unset, got {t.max_steps}")
    _require(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _require(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    _require(
        t.checkpoint_every is None or t.checkpoint_every >= 1,
        "train.checkpoint_every",
        f"must be >= 1 or unset, got {t.checkpoint_every}",
    )
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
    _require(
        t.mixed_precision in PRECISIONS,
        "train.mixed_precision",
        f"must be one of {PRECISIONS}, got '{t.mixed_precision}'",
    )
    _require(t.timeout_s >= 1, "train.timeout_s", f"must be >= 1, got {t.timeout_s}")
    _require(t.profile >= 0, "train.profile", f"must be >= 0 (0 = off), got {t.profile}")
    pk = t.peak_tflops
    _require(pk is None or pk > 0, "train.peak_tflops", f"must be > 0 or unset, got {pk}")
    _require(not t.output_dir == "", "train.output_dir", "must not be empty")
    eb = cfg.eval.batch_size
    _require(eb is None or eb >= 1, "eval.batch_size", f"must be >= 1 or unset, got {eb}")
    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _require(o.momentum >= 0, "optim.momentum", f"must be >= 0, got {o.momentum}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(o.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}, got '{o.schedule}'")
    _require(0 < o.plateau_factor < 1, "optim.plateau_factor", f"must be in (0, 1), got {o.plateau_factor}")
    _require(o.min_lr >= 0, "optim.min_lr", f"must be >= 0, got {o.min_lr}")
    _require(o.plateau_patience >= 0, "optim.plateau_patience", f"must be >= 0, got {o.plateau_patience}")
    g = cfg.ddp
    _require(g.comm_hook in COMM_HOOKS, "ddp.comm_hook", f"must be one of {COMM_HOOKS}, got '{g.comm_hook}'")
    cap = g.bucket_cap_mb
    _require(cap is None or cap > 0, "ddp.bucket_cap_mb", f"must be > 0 or unset, got {cap}")
    _require(g.powersgd_rank >= 1, "ddp.powersgd_rank", f"must be >= 1, got {g.powersgd_rank}")
    # PowerSGD's error feedback needs the first two steps' plain all-reduce (a PyTorch requirement).
    _require(g.powersgd_start_iter >= 2, "ddp.powersgd_start_iter", f"must be >= 2, got {g.powersgd_start_iter}")


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
