"""The README's test block is what CI runs; shipped configs load and validate."""

import re

import pytest
import yaml

from distalex.config import load_config

from helpers import ROOT


def test_ci_runs_the_readme_test_block_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    ci_block = ci.split("# --- README block (b) begins\n")[1].split("# --- README block (b) ends")[0]
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert any(ci_block.strip() in b for b in blocks), "README block (b) and .ci/run have drifted apart"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiment_configs_validate(path):
    cfg = load_config(str(path))
    assert cfg.experiment == path.stem


@pytest.mark.parametrize("path", sorted((ROOT / "launch").glob("*.yaml")), ids=lambda p: p.name)
def test_launch_configs_are_accelerate_configs(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes == yaml.safe_load(path.read_text())["num_processes"]
    assert cfg.num_processes >= cfg.num_machines >= 1
    assert "--split-mode" in path.read_text()  # each says which split mode it is for


def test_every_mutant_still_applies():
    """scripts/mutants.py patches the code by exact text: a refactor that moves the code must move
    the patch too (each text once in its file, each test selection's files there)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
    mutants = importlib.util.module_from_spec(spec)
    sys.modules["mutants"] = mutants
    spec.loader.exec_module(mutants)
    for m in mutants.MUTANTS:
        assert (ROOT / m.file).read_text().count(m.old) == 1, (m.name, m.file)
        for test in [*m.tests, *mutants.ORACLES]:
            assert (ROOT / test.split("::")[0]).exists(), (m.name, test)


def test_every_test_file_has_a_basename_of_its_own():
    """The test folders are not packages, so pytest imports each file by its basename: a second
    file of the same name anywhere under tests/ is an import error that drops it from the run."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
