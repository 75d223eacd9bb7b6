import dataclasses
import os
import typing
from pathlib import Path

import pytest
from omegaconf.errors import ReadonlyConfigError

from distalex.config import Config, ConfigError, load_config

from helpers import ROOT


def test_defaults_are_the_seed_experiment():
    cfg = load_config(str(ROOT / "configs" / "d2l_fashion_mnist.yaml"))
    assert (cfg.train.batch_size, cfg.optim.lr, cfg.train.epochs, cfg.data.image_size) == (128, 0.01, 10, 224)
    assert cfg.data.name == "fashion_mnist" and cfg.model.towers == 1 and cfg.optim.momentum == 0


def test_overrides_and_split_mode_resolve_towers():
    cfg = load_config(None, ["optim.lr=0.1", "data.train_limit=100"], split_mode="model-parallel")
    assert cfg.optim.lr == 0.1 and cfg.data.train_limit == 100 and cfg.model.towers == 2
    assert load_config(None, ["model.towers=4"], split_mode="model-parallel").model.towers == 4


def test_config_is_read_only():
    cfg = load_config(None, [])
    with pytest.raises(ReadonlyConfigError):
        cfg.train.batch_size = 3


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.batchsize=3", "train.batchsize"),
        ("train.batch_size=abc", "train.batch_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("optim.lr=-1", "optim.lr"),
        ("train.epochs=0", "train.epochs"),
        ("model.dropout=1.5", "model.dropout"),
        ("data.name=cifar", "data.name"),
        ("train.stop_check_every=0", "train.stop_check_every"),
        ("train.deterministic=maybe", "train.deterministic"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("train.profile=-1", "train.profile"),
        ("train.peak_tflops=0", "train.peak_tflops"),
        ("ddp.comm_hook=zstd", "ddp.comm_hook"),
        ("ddp.bucket_cap_mb=0", "ddp.bucket_cap_mb"),
        ("ddp.powersgd_rank=0", "ddp.powersgd_rank"),
        ("ddp.powersgd_start_iter=1", "ddp.powersgd_start_iter"),
        ("data.pipeline=half", "data.pipeline"),
        ("data.decode=npu", "data.decode"),
        ("data.resampler=cv2", "data.resampler"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_precision_spellings_and_auto(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    # A bare `no` is YAML's boolean false; it must still mean fp32.
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=fp32"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    # "auto" is decided later, per rank on its own device (tests/unit/test_amp.py), not while
    # loading the config, when no rank's device is set yet.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert load_config(None, []).train.mixed_precision == "auto"


# --------------------------------------------------------------------------- unusable config files


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"train:\n  batch_size: [1,\n", ["line 3", "expected the node content"]),  # malformed YAML
        (b"- train\n- model\n", ["line 1", "top level must be a mapping", "list"]),
        (b"42\n", ["line 1", "top level must be a mapping", "'42'"]),
        (b"train:\n  batch_size: 4\n  batch_size: 8\n", ["line 3", "duplicate key batch_size"]),
        (b"train:\n  output_dir: caf\xe9\n", ["line 2", "not UTF-8", "0xe9"]),
        (b"train:\n\tbatch_size: 3\n", ["line 2", "cannot start any token"]),
        (b"train:\n  output_dir: a\x00b\n", ["line 2", "#x0000"]),
        (b"train: 5\n", ["TrainConfig"]),  # a section given as a value
        (b"train:\n  bach_size: 4\n", ["train.bach_size"]),
        (b"a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
         b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
         ["expansion exceeds"]),  # an alias bomb
    ],
)  # fmt: skip
def test_unusable_config_files_are_one_line_naming_file_and_line(tmp_path, content, needles):
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(path))
    msg = one_line_error(excinfo)
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_yaml_tags_never_build_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    for i, text in enumerate(
        [
            f'!!python/object/apply:os.system ["touch {marker}"]\n',
            f'train: !!python/object/apply:os.system ["touch {marker}"]\n',
            f'train:\n  output_dir: !!python/object/apply:subprocess.check_output [["touch", "{marker}"]]\n',
        ]
    ):
        path = tmp_path / f"evil{i}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as excinfo:
            load_config(str(path))
        assert str(path) in one_line_error(excinfo)
    assert not marker.exists()


def test_config_path_that_is_not_a_readable_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    # A file that exists but cannot be read (works as root too, unlike chmod 000).
    if Path("/proc/self/mem").exists():
        with pytest.raises(ConfigError, match=r"'/proc/self/mem' cannot be read"):
            load_config("/proc/self/mem")
    if os.geteuid() != 0:
        locked = tmp_path / "locked.yaml"
        locked.write_text("train:\n  epochs: 1\n")
        locked.chmod(0)
        with pytest.raises(ConfigError, match="cannot be read"):
            load_config(str(locked))
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * (2 << 20) + b"\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_config(str(big))


def test_empty_config_file_means_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(str(path)).train.batch_size == load_config(None).train.batch_size


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("train.batch_size=[1,", ["train.batch_size=[1,", "cannot be parsed"]),
        ("train.output_dir={a: [", ["cannot be parsed"]),
        ("=5", ["'=5'", "no key"]),
        ("train.batch_size", ["not of the form key=value"]),
        ("model=3", ["model=3", "ModelConfig"]),
        ("train.batch_size=${nope}", ["train.batch_size", "nope"]),
        ("train.output_dir=${oc.env:DISTALEX_SURELY_UNSET_VAR}", ["train.output_dir", "DISTALEX_SURELY_UNSET_VAR"]),
        ("train.output_dir=${no_such_resolver:x}", ["train.output_dir", "no_such_resolver"]),
        ("model.width=${oc.decode:'1e400'}", ["model.width", "finite"]),
    ],
)
def test_bad_override_syntax_is_one_line(override, needles, monkeypatch):
    monkeypatch.delenv("DISTALEX_SURELY_UNSET_VAR", raising=False)
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, [override])
    msg = one_line_error(excinfo)
    for needle in needles:
        assert needle in msg, msg


def test_interpolations_resolve_once_at_load(monkeypatch):
    monkeypatch.setenv("DISTALEX_TEST_OUT", "/tmp/somewhere")
    cfg = load_config(None, ["train.output_dir=${oc.env:DISTALEX_TEST_OUT}/${experiment}"])
    assert cfg.train.output_dir == "/tmp/somewhere/d2l_fashion_mnist"
    monkeypatch.setenv("DISTALEX_TEST_OUT", "/elsewhere")
    assert cfg.train.output_dir == "/tmp/somewhere/d2l_fashion_mnist"


# --------------------------------------------------------------------------- numbers, for every key of the schema


def schema_keys(kind) -> list:
    """Dotted keys of the schema whose type is ``kind`` or Optional[kind], read from the dataclasses
    themselves, so a key added later is covered without touching this test."""
    keys = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            elif hint in (kind, kind | None):
                keys.append(prefix + f.name)

    walk(Config, "")
    return keys


FLOAT_KEYS = schema_keys(float)
INT_KEYS = schema_keys(int)


def test_the_schema_has_the_expected_numeric_keys():
    # Guards the discovery itself: an empty list would make the tests below vacuous.
    assert {"model.width", "model.dropout", "optim.lr", "optim.momentum", "data.pca_sigma"} <= set(FLOAT_KEYS)
    assert {"train.batch_size", "train.epochs", "train.seed", "model.towers", "train.max_steps"} <= set(INT_KEYS)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_rejects_non_finite(key, value):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, [f"{key}={value}"])
    msg = one_line_error(excinfo)
    assert f"'{key}'" in msg and "finite" in msg, msg


@pytest.mark.parametrize("value", [str(2**63), str(-(2**63) - 1), "1" + "0" * 30])
@pytest.mark.parametrize("key", INT_KEYS)
def test_every_int_key_rejects_values_beyond_int64(key, value):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, [f"{key}={value}"])
    msg = one_line_error(excinfo)
    assert f"'{key}'" in msg and "64-bit" in msg, msg


def test_non_finite_values_in_a_file_are_refused_too(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"'optim\.lr': must be a finite number, got inf"):
        load_config(str(path))


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("optim.momentum=1", ["optim.momentum", "[0, 1)", "1.0"]),
        ("optim.momentum=1.5", ["optim.momentum", "1.5"]),
        ("model.dropout=1", ["model.dropout", "[0, 1)"]),
        ("model.width=17", ["model.width", "(0, 16]", "17"]),
        ("model.width=0", ["model.width", "(0, 16]"]),
        ("train.timeout_s=100000000000", ["train.timeout_s", "100000000000"]),
        ("train.seed=-1", ["train.seed", "-1"]),
        (f"train.seed={2**32}", ["train.seed", str(2**32)]),
        ("data.num_workers=100000", ["data.num_workers", "100000"]),
        ("optim.min_lr=0.5", ["optim.min_lr", "optim.lr=0.01", "0.5"]),
    ],
)
def test_absurd_values_are_refused_with_the_numbers(override, needles):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, [override])
    msg = one_line_error(excinfo)
    for needle in needles:
        assert needle in msg, msg


def test_shipped_configs_still_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(str(path))
