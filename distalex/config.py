"""Typed experiment config: dataclasses -> OmegaConf, loaded and validated once.

Order of precedence: schema defaults < YAML file < ``--split-mode`` < ``key=value``
dot-list overrides.  Every problem is reported as one :class:`ConfigError` line
that names the key; the CLI turns it into exit status 2.  After
:func:`load_config` returns, the config is read-only.
"""

from __future__ import annotations

import io
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distalex.errors import ConfigError
from distalex.runtime.io import read_bytes

SPLIT_MODES = ("single", "ddp", "model-parallel", "hybrid", "pipeline", "fsdp")
DATASETS = ("fashion_mnist", "synthetic", "imagefolder")
PRECISIONS = ("auto", "no", "bf16", "fp16")
# YAML 1.1 reads a bare `no` as a boolean; OmegaConf then stores "False".
_PRECISION_SPELLINGS = {"False": "no", "false": "no", "fp32": "no"}
SCHEDULES = ("constant", "plateau")
COMM_HOOKS = ("none", "bf16", "fp16", "powersgd")
INITS = ("xavier", "paper")
DROPOUT_RNGS = ("placement_invariant", "process")
PIPELINE_SCHEDULES = ("gpipe", "1f1b")
FSDP_UNITS = ("layer", "network")
# Keys that decide which examples a step trains on: a resume that changes one would
# continue at a data position that means something else (refused unless listed in
# train.resume_allow_changes).  data.image_size is checked with the network.
STEP_KEYS = (
    "train.batch_size",
    "train.seed",
    "data.name",
    "data.root",
    "data.train_limit",
    "data.test_limit",
    "data.synthetic_train_size",
    "data.synthetic_test_size",
    "data.resize_size",
)
# Upper bounds of values that are absurd beyond them (each is far above any real run).
MAX_WIDTH = 16
MAX_WORKERS = 256
PIPELINES = ("uint8", "float")  # data.pipeline
DECODES = ("cpu", "gpu", "auto")  # data.decode
RESAMPLERS = ("pil", "torch")  # data.resampler
MAX_TIMEOUT_S = 30 * 24 * 3600
MAX_THREADS = 1024  # CPU threads per process; the largest machines have a few hundred cores


@dataclass
class ModelConfig:
    # Towers of the paper's layout (§3.5).  Unset: 2 (the paper's) for
    # model-parallel, 1 (the d2l network) for single, ddp and hybrid.
    towers: Optional[int] = None
    width: float = 1.0  # channel/unit multiplier, 1.0 = the paper's widths
    dropout: float = 0.5
    # placement_invariant: masks a function of (train.seed, step, layer, global row, unit), the same
    # in every placement (docs/design.md, "Dropout"); process: each process's own torch RNG (d2l's).
    dropout_rng: str = "placement_invariant"
    lrn: bool = False  # per-tower LRN after conv1/conv2 (paper §3.3)
    in_channels: int = 1
    num_classes: int = 10
    conv1_padding: int = 1  # d2l pads 1; the paper's 55x55 maps need 2 at 224
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
    # imagefolder: uint8 -- workers make uint8 crops, the float work (lighting, mean) runs on the
    # training device; float -- all of it on the CPU in float (the older pipeline, for comparison).
    pipeline: str = "uint8"
    # imagefolder: where training JPEGs are decoded: cpu (workers), gpu (batched nvJPEG on the
    # CUDA device; other files still on the CPU), auto (gpu on a CUDA device, else cpu).  cpu by
    # default until nvJPEG's pixels and speed are measured on a GPU (bench/gpu_decode_check.py).
    decode: str = "cpu"
    # imagefolder, uint8 pipeline: what resizes a training image on the CPU.  pil -- PIL's
    # bilinear resize of the crop's window; torch -- torch's uint8 kernel (16-bit weights) on a
    # tensor decoded without PIL's copies: about 1.16x pil's samples per core, and about twice as
    # many values a level away from the float pipeline's (docs/imagenet.md, "The input pipeline").
    resampler: str = "pil"


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
    # Keys of STEP_KEYS that may differ from the checkpoint's on resume, e.g. [train.batch_size].
    resume_allow_changes: List[str] = field(default_factory=list)
    overwrite: bool = False
    # auto | no | bf16 | fp16 (fp16 on GPU only).  "auto": a bf16 or fp16 that
    # `accelerate launch --mixed_precision` chose, else bf16 where the device
    # computes it natively (measured 1.9x on AVX512-BF16 CPUs, same accuracy;
    # tensor cores on GPUs from compute capability 8.0), else no (fp32).
    # Decided by each rank on its own device (distalex/runtime/precision.py); the config keeps
    # "auto" and the run's records (summary.json) name the precision used.
    mixed_precision: str = "auto"
    # CPU threads per process (torch.set_num_threads), applied at start-up whatever launched the
    # process: launchers overwrite OMP_NUM_THREADS (accelerate launch writes 1).  0 = auto: the
    # cores this process may use (affinity, cgroup quota) / the job's processes on this node.
    threads: int = 0
    channels_last: bool = True  # measured 1.16x with bf16 on CPU; a layout change only
    # CPU: keep freed memory in the process instead of page-faulting it back every
    # step (distalex/runtime/hostmem.py); no effect on the arithmetic.
    reuse_host_memory: bool = True
    compile: bool = False
    cudnn_benchmark: bool = True  # ignored (off) when deterministic
    # Bitwise-reproducible kernels on GPUs: cudnn.benchmark off, deterministic
    # algorithms only, CUBLAS_WORKSPACE_CONFIG set (distalex/runtime/determinism.py).
    deterministic: bool = False
    timeout_s: int = 300  # every process group's timeout: a dead or hung rank ends the job
    # Steps between the all-ranks check for SIGTERM/SIGINT (one small all-reduce
    # over the gloo control group; across machines a network round trip).  Every
    # rank checks at the same steps, so the step the run stops at is agreed.
    stop_check_every: int = 10
    progress: bool = True
    # Record this many training steps (after 2 warm-up steps) with torch.profiler:
    # <output_dir>/profile/{trace.json,summary.json,profile.png}.  0 = off.
    profile: int = 0
    # Peak TFLOP/s of one device (one process on a CPU) for MFU; unset = the
    # datasheet table for GPUs, a measured matmul peak for CPUs (distalex/telemetry/peak.py).
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
class PipelineConfig:
    """``--split-mode pipeline``: the network cut by layers into stages (docs/pipeline.md).
    Whether the numbers fit the launched processes is checked with the mesh
    (distalex/parallel/mesh.py), like every other placement's."""

    # Stages per replica (S).  Unset: one more than the boundaries if given, else every process
    # (one replica); W = replicas x S, so pipeline.stages=2 on 4 processes is 2 replicas x 2 stages.
    stages: Optional[int] = None
    microbatches: int = 4  # M: micro-batches of each replica's rows per step (must divide them)
    schedule: str = "1f1b"  # gpipe (all forwards, then all backwards) | 1f1b (needs M >= S)
    # The first layer of stages 1..S-1, e.g. [conv3, fc6]; empty: balanced by the layers' FLOPs.
    boundaries: List[str] = field(default_factory=list)


@dataclass
class FSDPConfig:
    """Fully sharded data parallelism (FSDP2's fully_shard) under --split-mode fsdp."""

    # layer: each conv/fc layer is one unit, all-gathered just before it runs (the least
    # memory); network: the whole model is one unit (one all-gather per pass, like ZeRO-3 on
    # a single block).
    unit: str = "layer"
    # Free the gathered weights after the forward and gather them again for the backward
    # (FSDP2's reshard_after_forward): less memory, one more all-gather per unit and step.
    reshard_after_forward: bool = True


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
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; anything near this is not one


def _yaml_problem(exc: yaml.YAMLError, text: str = "", located: bool = True) -> str:
    """'line L, column C: problem (context)' of a YAML error, on one line (without the
    place when ``located`` is false: an override's value is a line of its own)."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: no mark, a character position
        line = text[: exc.position].count("\n") + 1
        return f"line {line}: character #x{exc.character:04x} is not allowed in YAML"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None)
    if problem is None:
        return " ".join(str(exc).split())
    problem = " ".join(problem.split()).split(" See ")[0]  # OmegaConf's alias limit points at its docs
    context = getattr(exc, "context", None)
    text = problem + (f" ({context})" if context else "")
    return f"line {mark.line + 1}, column {mark.column + 1}: {text}" if mark and located else text


def _keyed(exc: OmegaConfBaseException, where: str) -> str:
    """An OmegaConf error as one line after ``where`` (a file or an override)."""
    msg = _one_line(exc)
    return f"{where}: {msg[len('config: ') :]}" if msg.startswith("config: ") else f"{where}: {msg}"


def read_config_file(path: str) -> DictConfig:
    """A YAML config file as a DictConfig.  Every way a file can be unusable (missing,
    a directory, unreadable, not UTF-8, not YAML, not a mapping, a duplicated key,
    tags that would build Python objects, alias bombs) is one ConfigError line that
    names the file and, where YAML knows it, the line."""
    where = f"config file '{path}'"
    problem = path_problem(path)
    if problem is not None:
        raise ConfigError(f"--config: {problem}")
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{where} is a directory, not a YAML file")
    if not p.exists():
        raise ConfigError(f"{where} does not exist")
    # Non-blocking, regular files only, at most MAX_CONFIG_BYTES (a FIFO or /dev/zero never hangs the run).
    raw = read_bytes(p, what="config file", max_bytes=MAX_CONFIG_BYTES, error=ConfigError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{where}, line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
    try:
        top = yaml.compose(text, Loader=yaml.SafeLoader)  # the document's shape, nothing constructed
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}, {_yaml_problem(exc, text)}") from None
    if top is not None and not isinstance(top, yaml.MappingNode):
        kind = "list" if isinstance(top, yaml.SequenceNode) else f"single value '{str(top.value)[:40]}'"
        raise ConfigError(
            f"{where}, line {top.start_mark.line + 1}: the top level must be a mapping of "
            f"sections (model:, data:, train:, ...), got a {kind}"
        )
    try:
        # OmegaConf's safe loader: no Python objects, duplicated keys and alias bombs refused.
        loaded = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}, {_yaml_problem(exc, text)}") from None
    except (OmegaConfBaseException, OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {' '.join(str(exc).split())}") from None
    return loaded


def _apply_override(cfg: DictConfig, item: str) -> DictConfig:
    # Every message quotes the override as shown_text: one line, whatever bytes it holds.
    shown = shown_text(item)
    problem = text_problem(item)
    if problem is not None:
        raise ConfigError(f"override '{shown}' {problem}")
    if "=" not in item:
        raise ConfigError(f"override '{shown}' is not of the form key=value")
    key, value = item.split("=", 1)
    if not key:
        raise ConfigError(f"override '{shown}' has no key before '='")
    if OmegaConf.select(cfg, key, default=MISSING) is MISSING and not _is_optional_none(cfg, key):
        raise ConfigError(f"config key '{shown_text(key)}' is unknown")
    try:
        parsed = OmegaConf.from_dotlist([item])
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override '{shown}': the value '{shown_text(value)}' cannot be parsed "
            f"({_yaml_problem(exc, value, located=False)})"
        ) from None
    try:
        return OmegaConf.merge(cfg, parsed)
    except OmegaConfBaseException as exc:
        msg = _one_line(exc)
        raise ConfigError(
            f"override '{shown}': {msg[len('config: ') :]}" if msg.startswith("config: ") else msg
        ) from None


def load_config(
    path: Optional[str] = None,
    overrides: Optional[List[str]] = None,
    split_mode: Optional[str] = None,
    base: Optional[dict] = None,
    base_name: str = "config",
) -> DictConfig:
    """Merge schema, YAML, split mode and overrides; validate; return read-only.
    ``base``: a config as a plain dict (a checkpoint's), merged in place of the YAML
    file; ``base_name`` names it in messages."""
    cfg = OmegaConf.structured(Config)
    if base is not None:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(base))
        except (OmegaConfBaseException, ValueError) as exc:
            raise ConfigError(_keyed(exc, base_name)) from None
    if path is not None:
        from_file = read_config_file(path)
        try:
            cfg = OmegaConf.merge(cfg, from_file)
        except OmegaConfBaseException as exc:
            raise ConfigError(_keyed(exc, f"config file '{path}'")) from None
    try:
        if split_mode is not None:
            cfg.split_mode = split_mode
        for item in overrides or []:
            cfg = _apply_override(cfg, item)
        # Interpolations (${...}) are resolved once, here, so a broken one is bad input now
        # and not a traceback at first use.
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    cfg.train.mixed_precision = _PRECISION_SPELLINGS.get(cfg.train.mixed_precision, cfg.train.mixed_precision)
    if cfg.model.towers is None:
        cfg.model.towers = 2 if cfg.split_mode == "model-parallel" else 1
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _is_optional_none(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {problem}")


INT64 = 1 << 63  # every integer ends up in a C int64 somewhere (tensors, seeds, counters)


def _leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf of a config, nested sections and lists included."""
    items = node.items() if isinstance(node, DictConfig) else enumerate(node)
    for key, value in items:
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (DictConfig, ListConfig)):
            yield from _leaves(value, full)
        else:
            yield full, value


def check_numbers(cfg: DictConfig) -> None:
    """Every float of the config is finite and every integer fits an int64: one mechanism
    for every key, present and future, before any key's own bounds are checked."""
    for key, value in _leaves(cfg):
        if isinstance(value, bool):
            continue
        if isinstance(value, float):
            _require(math.isfinite(value), key, f"must be a finite number, got {value}")
        elif isinstance(value, int):
            _require(-INT64 <= value < INT64, key, f"must fit a 64-bit integer, got {value}")


# Keys naming a file or folder (train.resume also takes "auto").  PATH_MAX and NAME_MAX are
# the kernel's limits (Linux: 4096 bytes a path, 255 a component); os.pathconf says where it can.
PATH_KEYS = ("data.root", "train.output_dir", "train.resume")
PATH_MAX, NAME_MAX = 4096, 255
# The longest name distalex puts under train.output_dir (a checkpoint's temporary file,
# checkpoints/.step_<9 digits>.safetensors.<pid>.tmp, with a 7-digit pid, and room to spare).
RUN_DIR_TAIL = 64


def _limits(path: str) -> tuple[int, int]:
    """(PATH_MAX, NAME_MAX) of the file system the path would be on (its nearest existing folder)."""
    folder = os.path.dirname(os.path.abspath(path)) if len(path) < PATH_MAX else os.getcwd()
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        return os.pathconf(folder or "/", "PC_PATH_MAX"), os.pathconf(folder or "/", "PC_NAME_MAX")
    except (OSError, ValueError):
        return PATH_MAX, NAME_MAX


def text_problem(value: str) -> str | None:
    """Why a string cannot be a config value the OS and the records take, or None: a NUL
    character, or text that is not Unicode (a non-UTF-8 byte on the command line arrives as a
    lone surrogate, which no file, JSON record or log line can hold)."""
    if "\0" in value:
        return f"contains a NUL character (at position {value.index(chr(0))})"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raw = bad.encode("utf-8", "surrogateescape") if "\udc80" <= bad <= "\udcff" else None
        what = f"the byte 0x{raw[0]:02x}, which is not UTF-8" if raw else f"the lone surrogate U+{ord(bad):04X}"
        return f"contains {what} (at position {exc.start}); use UTF-8 text"
    return None


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127)}


def shown_text(value: str) -> str:
    """``value`` printable on one line: a non-UTF-8 byte as ``\\xff``, other lone surrogates
    and control characters (a newline, say) escaped."""
    try:
        text = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        text = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.translate(_CONTROL)


def path_problem(value: str, tail: int = 0) -> str | None:
    """Why ``value`` cannot be a path on this machine, or None: not text the file system can
    encode, a NUL, a component longer than NAME_MAX bytes, or (as an absolute path, plus
    ``tail`` bytes distalex appends under it) longer than PATH_MAX bytes."""
    problem = text_problem(value)
    if problem is not None:
        return problem
    try:
        encoded = os.fsencode(value)
    except UnicodeEncodeError:
        return f"cannot be encoded in the file system's encoding ({sys.getfilesystemencoding()})"
    path_max, name_max = _limits(value)
    for part in encoded.split(b"/"):
        if len(part) > name_max:
            shown = shown_text(part[:24].decode("utf-8", "replace"))  # one line, whatever it holds
            return f"its component '{shown}...' is {len(part)} bytes long; the file system allows {name_max} (NAME_MAX)"
    absolute = len(os.fsencode(os.path.abspath(value))) if len(encoded) < path_max else len(encoded)
    if absolute + tail >= path_max:
        extra = f" (and distalex adds up to {tail} bytes under it)" if tail else ""
        return f"is {absolute} bytes long as an absolute path{extra}; the system allows {path_max - 1} (PATH_MAX)"
    return None


def check_strings(cfg: DictConfig) -> None:
    """Every string of the config is text the OS and the records can hold, and every path
    key a path the OS accepts: one mechanism for every key, checked once at start-up."""
    for key, value in _leaves(cfg):
        if isinstance(value, str):
            problem = text_problem(value)
            if problem is None and key in PATH_KEYS and not (key == "train.resume" and value == "auto"):
                problem = path_problem(value, RUN_DIR_TAIL if key == "train.output_dir" else 0)
            _require(problem is None, key, problem or "")


def validate(cfg: DictConfig) -> None:
    """Value checks that the types alone cannot express. World-size checks live in parallel.py."""
    check_numbers(cfg)
    check_strings(cfg)
    _require(cfg.split_mode in SPLIT_MODES, "split_mode", f"must be one of {SPLIT_MODES}, got '{cfg.split_mode}'")
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    _require(m.towers >= 1, "model.towers", f"must be >= 1, got {m.towers}")
    _require(
        0 < m.width <= MAX_WIDTH,
        "model.width",
        f"must be in (0, {MAX_WIDTH}] ({MAX_WIDTH} already means {MAX_WIDTH**2}x the paper's fc weights), got {m.width}",
    )
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(m.in_channels >= 1, "model.in_channels", f"must be >= 1, got {m.in_channels}")
    _require(m.num_classes >= 2, "model.num_classes", f"must be >= 2, got {m.num_classes}")
    _require(m.init in INITS, "model.init", f"must be one of {INITS}, got '{m.init}'")
    _require(cfg.fsdp.unit in FSDP_UNITS, "fsdp.unit", f"must be one of {FSDP_UNITS}, got '{cfg.fsdp.unit}'")
    _require(
        m.dropout_rng in DROPOUT_RNGS, "model.dropout_rng", f"must be one of {DROPOUT_RNGS}, got '{m.dropout_rng}'"
    )
    _require(m.conv1_padding >= 0, "model.conv1_padding", f"must be >= 0, got {m.conv1_padding}")
    _require(d.name in DATASETS, "data.name", f"must be one of {DATASETS}, got '{d.name}'")
    _require(d.image_size >= 1, "data.image_size", f"must be >= 1, got {d.image_size}")
    _require(d.resize_size >= 1, "data.resize_size", f"must be >= 1, got {d.resize_size}")
    for key in ("train_limit", "test_limit"):
        val = d[key]
        _require(val is None or val >= 1, f"data.{key}", f"must be >= 1 or unset, got {val}")
    _require(d.synthetic_train_size >= 1, "data.synthetic_train_size", "must be >= 1")
    _require(d.synthetic_test_size >= 1, "data.synthetic_test_size", "must be >= 1")
    _require(d.pca_sigma >= 0, "data.pca_sigma", f"must be >= 0, got {d.pca_sigma}")
    _require(d.pipeline in PIPELINES, "data.pipeline", f"must be one of {PIPELINES}, got '{d.pipeline}'")
    _require(d.decode in DECODES, "data.decode", f"must be one of {DECODES}, got '{d.decode}'")
    _require(d.resampler in RESAMPLERS, "data.resampler", f"must be one of {RESAMPLERS}, got '{d.resampler}'")
    _require(
        not (d.pipeline == "float" and d.decode == "gpu"),
        "data.decode",
        "gpu needs data.pipeline=uint8 (the float pipeline decodes on the CPU)",
    )
    _require(
        0 <= d.num_workers <= MAX_WORKERS,
        "data.num_workers",
        f"must be in [0, {MAX_WORKERS}], got {d.num_workers}",
    )
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
    _require(
        0 <= t.threads <= MAX_THREADS,
        "train.threads",
        f"must be in [0, {MAX_THREADS}] (0 = auto: the usable cores / the processes on this node), got {t.threads}",
    )
    _require(
        1 <= t.timeout_s <= MAX_TIMEOUT_S,
        "train.timeout_s",
        f"must be in [1, {MAX_TIMEOUT_S}] seconds (30 days), got {t.timeout_s}",
    )
    _require(0 <= t.seed < 2**32, "train.seed", f"must be in [0, 2**32), got {t.seed}")
    _require(t.stop_check_every >= 1, "train.stop_check_every", f"must be >= 1, got {t.stop_check_every}")
    _require(t.profile >= 0, "train.profile", f"must be >= 0 (0 = off), got {t.profile}")
    pk = t.peak_tflops
    _require(pk is None or pk > 0, "train.peak_tflops", f"must be > 0 or unset, got {pk}")
    _require(not t.output_dir == "", "train.output_dir", "must not be empty")
    for key in t.resume_allow_changes:
        _require(key in STEP_KEYS, "train.resume_allow_changes", f"'{key}' is not one of {STEP_KEYS}")
    eb = cfg.eval.batch_size
    _require(eb is None or eb >= 1, "eval.batch_size", f"must be >= 1 or unset, got {eb}")
    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _require(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(o.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}, got '{o.schedule}'")
    _require(0 < o.plateau_factor < 1, "optim.plateau_factor", f"must be in (0, 1), got {o.plateau_factor}")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    _require(o.plateau_patience >= 0, "optim.plateau_patience", f"must be >= 0, got {o.plateau_patience}")
    g = cfg.ddp
    _require(g.comm_hook in COMM_HOOKS, "ddp.comm_hook", f"must be one of {COMM_HOOKS}, got '{g.comm_hook}'")
    cap = g.bucket_cap_mb
    _require(cap is None or cap > 0, "ddp.bucket_cap_mb", f"must be > 0 or unset, got {cap}")
    _require(g.powersgd_rank >= 1, "ddp.powersgd_rank", f"must be >= 1, got {g.powersgd_rank}")
    pp = cfg.pipeline
    _require(pp.stages is None or pp.stages >= 1, "pipeline.stages", f"must be >= 1 or unset, got {pp.stages}")
    _require(pp.microbatches >= 1, "pipeline.microbatches", f"must be >= 1, got {pp.microbatches}")
    _require(
        pp.schedule in PIPELINE_SCHEDULES,
        "pipeline.schedule",
        f"must be one of {PIPELINE_SCHEDULES}, got '{pp.schedule}'",
    )
    # PowerSGD's error feedback needs the first two steps' plain all-reduce (a PyTorch requirement).
    _require(g.powersgd_start_iter >= 2, "ddp.powersgd_start_iter", f"must be >= 2, got {g.powersgd_start_iter}")


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
