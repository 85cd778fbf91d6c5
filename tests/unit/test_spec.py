"""Job specs are strict: every mistake names its field path, the bad value and what is allowed."""
from __future__ import annotations

import pytest

from shipyard.spec import SpecError, apply_overrides, flatten, load_job, parse_job

BASE = {"name": "t", "model": {"family": "minrnn", "dim": 32, "depth": 1},
        "data": {"seq_len": 16}, "train": {"steps": 4, "batch_size": 4}}


def errors_of(raw, overrides=()):
    with pytest.raises(SpecError) as e:
        parse_job(raw, overrides)
    return str(e.value)


def test_a_valid_spec_reads_into_typed_blocks():
    spec = parse_job(BASE)
    assert spec.family == "minrnn" and spec.model.dim == 32 and spec.data.seq_len == 16
    assert spec.train.steps == 4 and spec.sharding.strategy == "ddp"
    assert spec.to_dict()["model"]["family"] == "minrnn"
    assert parse_job(spec.to_dict()) == spec  # the dict form round-trips


def test_unknown_key_names_the_path_and_suggests_the_close_one():
    msg = errors_of({**BASE, "train": {"stepz": 3, "batch_size": 4}})
    assert "train.stepz: unknown field (did you mean 'steps'?)" in msg
    assert "allowed: steps, batch_size" in msg


def test_wrong_type_names_field_value_and_expected_type():
    msg = errors_of({**BASE, "train": {"steps": "many", "batch_size": 4}})
    assert "train.steps: expected an integer, got 'many' (str)" in msg
    msg = errors_of({**BASE, "scaling": {"use_gpu": "yes"}})
    assert "scaling.use_gpu: expected a boolean (true/false), got 'yes' (str)" in msg


def test_booleans_are_not_integers():
    assert "train.steps: expected an integer, got True (bool)" in errors_of(
        {**BASE, "train": {"steps": True, "batch_size": 4}})


def test_literal_lists_the_allowed_values():
    msg = errors_of({**BASE, "sharding": {"strategy": "zero"}})
    assert "sharding.strategy: 'zero' (str) is not allowed; choose one of 'ddp', 'fsdp', 'deepspeed'" in msg
    msg = errors_of({**BASE, "sharding": {"strategy": "deepspeed", "zero_stage": 4}})
    assert "sharding.zero_stage: 4 (int) is not allowed; choose one of 1, 2, 3" in msg


def test_family_fields_are_checked_against_the_family_config():
    msg = errors_of({**BASE, "model": {"family": "minrnn", "cell": "lstm", "widht": 3}})
    assert "model.cell: 'lstm' (str) is not allowed; choose one of 'mingru', 'minlstm'" in msg
    assert "model.widht: unknown field" in msg
    assert "model.family: 'gpt' (str) is not a known family; choose one of minrnn" in errors_of(
        {**BASE, "model": {"family": "gpt"}})


def test_all_problems_are_reported_at_once():
    msg = errors_of({**BASE, "train": {"steps": "x", "lr": "fast"}, "scaling": {"num_workerz": 2}})
    assert "train.steps" in msg and "train.lr" in msg and "scaling.num_workerz" in msg


def test_yaml_1_1_exponent_strings_are_read_as_floats():
    spec = parse_job({**BASE, "train": {**BASE["train"], "lr": "3e-4"}})
    assert spec.train.lr == 3e-4


def test_cross_field_checks():
    msg = errors_of({**BASE, "train": {"steps": 4, "batch_size": 5}, "scaling": {"num_workers": 2}})
    assert "train.batch_size: 5 is not divisible by scaling.num_workers=2" in msg
    msg = errors_of({**BASE, "sharding": {"strategy": "ddp", "offload": True}})
    assert "only apply to strategy 'deepspeed'" in msg


def test_overrides_set_nested_values_as_yaml_scalars():
    raw = apply_overrides(BASE, ["train.steps=10", "train.lr=1e-3", "sharding.strategy=fsdp", "model.depth=2"])
    spec = parse_job(raw)
    assert (spec.train.steps, spec.train.lr, spec.sharding.strategy, spec.model.depth) == (10, 1e-3, "fsdp", 2)
    assert BASE["train"]["steps"] == 4  # the input is not modified
    assert "train.stepz: unknown field" in errors_of(BASE, ["train.stepz=3"])
    with pytest.raises(SpecError, match="expected key.sub=value"):
        parse_job(BASE, ["train.steps"])


def test_load_job_reports_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nmodel: {family: minrnn}\ntrain: {steps: [1}\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job(bad)
    with pytest.raises(SpecError, match="no such job spec"):
        load_job(tmp_path / "missing.yaml")


def test_flatten_for_mlflow_params():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}
