"""Every job spec shipped in jobs/ is valid, and `shipyard check` says so (and catches a bad one)."""
from __future__ import annotations

from pathlib import Path

import pytest

from shipyard.cli import main
from shipyard.spec import load_job
from shipyard.tune.spec import load_sweep

ALL = sorted((Path(__file__).resolve().parents[2] / "jobs").rglob("*.yaml"))
SWEEPS = [p for p in ALL if p.parent.name == "sweeps"]
JOBS = [p for p in ALL if p not in SWEEPS]


def test_there_are_job_specs():
    assert JOBS


@pytest.mark.parametrize("path", JOBS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_job_spec_is_valid(path):
    spec = load_job(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# shipyard "), "each job spec starts with the command that runs it"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_spec_is_valid(path):
    sweep = load_sweep(path)
    assert sweep.tune.space
    assert path.read_text().splitlines()[0] == f"# shipyard sweep jobs/sweeps/{path.name}"


def test_check_command(tmp_path, capsys):
    assert main(["check", *map(str, ALL)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {family: minrnn}\nsharding: {strategy: zero}\n")
    assert main(["check", str(bad)]) == 1
    assert "sharding.strategy" in capsys.readouterr().out
