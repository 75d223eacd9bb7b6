"""Paths and text the OS refuses: the config's one check of every string and path key, thrown
generated strings (any Unicode, lone surrogates -- what a non-UTF-8 byte in ``sys.argv``
becomes --, NUL, very long components and paths).  The property: a ConfigError line or a
config whose every path the OS accepts, never another exception."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distalex.config import load_config, path_problem, text_problem
from distalex.errors import ConfigError

from helpers import TINY

ODD = st.sampled_from(["\udcff", "\udc80", "\ud800", "\0", "/", "é", "\n", "${", "'", '"', " ", "a" * 255, "b" * 256])
PIECES = st.one_of(st.text(max_size=20), ODD, st.characters(codec=None, min_codepoint=0xD800, max_codepoint=0xDFFF))
STRINGS = st.one_of(
    st.lists(PIECES, max_size=12).map("".join),
    st.builds(lambda part, n: "/tmp/" + "/".join([part] * n), st.text(min_size=1, max_size=300), st.integers(1, 40)),
)
KEYS = ("train.output_dir", "data.root", "train.resume", "experiment", "tracking.run_name", "tracking.group")


def _usable_path(value: str) -> None:
    """The OS takes ``value`` as a path: stat it (absolute, as distalex's resolve() does) and
    get an answer about the file, never 'name too long', a NUL ValueError or an encoding error."""
    code = 0
    try:
        os.stat(os.path.abspath(value))
    except OSError as exc:
        code = exc.errno
    assert code in (0, errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.ELOOP), os.strerror(code)


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(KEYS), value=STRINGS)
def test_every_generated_string_is_a_config_error_or_accepted(key, value):
    refused = None
    try:
        cfg = load_config(TINY, [f"{key}={value}", "train.max_steps=1"])
    except ConfigError as exc:
        refused = str(exc)
    if refused is not None:
        assert "\n" not in refused
        return
    for k in ("train.output_dir", "data.root"):
        got = cfg.train.output_dir if k == "train.output_dir" else cfg.data.root
        if got is not None:
            _usable_path(str(got))
            _usable_path(os.path.join(str(got), "checkpoints", ".step_000000001.safetensors.1234567.tmp"))
    for text in (cfg.experiment, cfg.tracking.run_name or "", cfg.tracking.group or ""):
        text.encode("utf-8")  # every record (JSON, YAML, wandb, log lines) can hold it
        assert "\0" not in text


@settings(max_examples=300, deadline=None)
@given(value=STRINGS)
def test_path_problem_never_raises_and_accepts_only_usable_paths(value):
    problem = path_problem(value)
    assert problem is None or isinstance(problem, str) and "\n" not in problem
    if problem is None:
        _usable_path(value)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("/tmp/" + "c" * 300, "300 bytes long"),
        ("/tmp/" + "é" * 128, "256 bytes long"),  # 128 characters, 256 bytes: NAME_MAX counts bytes
        ("/tmp/" + "/".join(["d" * 200] * 21), "PATH_MAX"),
        ("/tmp/a\0b", "NUL"),
        ("/tmp/run\udcff", "byte 0xff"),
        ("/tmp/run\ud800", "U+D800"),
    ],
)
def test_path_problem_names_the_limit(value, needle):
    assert needle in path_problem(value)


def test_the_limits_accept_what_the_os_accepts(tmp_path):
    ok = tmp_path / ("n" * 255)
    ok.mkdir()  # 255 bytes is a legal component
    assert path_problem(str(ok)) is None and text_problem("naïve ☃") is None
    assert path_problem("auto") is None
    cfg = load_config(TINY, ["train.resume=auto", f"train.output_dir={ok}"])
    assert cfg.train.output_dir == str(ok)


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (lambda t: [f"train.resume={t}/{'r' * 256}.safetensors"], ["train.resume", "268 bytes", "NAME_MAX"]),
        (lambda t: [f"data.root={t}/" + "/".join(["d" * 250] * 17)], ["data.root", "PATH_MAX"]),
        (lambda t: [f"train.output_dir={t}/run\udcff"], ["train.output_dir", "0xff", "not UTF-8"]),
        (lambda t: ["experiment=caf\udce9"], ["experiment=caf\\xe9", "0xe9", "not UTF-8"]),
        (lambda t: ["tracking.run_name=a\0b"], ["tracking.run_name", "NUL"]),
        (lambda t: ["train.output_dir=${oc.env:DISTALEX_TEST_ODD}"], ["config key 'train.output_dir'", "0xfe"]),
    ],
)
def test_each_key_and_the_config_path_are_checked(tmp_path, monkeypatch, make, needles):
    monkeypatch.setenv("DISTALEX_TEST_ODD", os.fsdecode(b"/tmp/run\xfe"))
    with pytest.raises(ConfigError) as info:
        load_config(TINY, make(tmp_path))
    assert all(n in str(info.value) for n in needles), str(info.value)
    with pytest.raises(ConfigError, match="--config: .*NAME_MAX"):
        load_config(f"{tmp_path}/{'y' * 300}.yaml")
    with pytest.raises(ConfigError, match="--config: .*PATH_MAX"):
        load_config(f"{tmp_path}/" + "/".join(["y" * 250] * 17))
