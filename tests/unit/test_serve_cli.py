"""`shipyard serve` without a server: what TARGET resolves to (checkpoint or run directory, MLflow
run id / name, registered model), the `--config` file (validated with Ray Serve's own schema
class, no token or credentials in it), and option errors that name the option."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from serve_checkpoints import write_checkpoints  # noqa: E402

from shipyard.cli import main  # noqa: E402
from shipyard.serve import app as serving  # noqa: E402
from shipyard.serve.target import resolve  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoints(tmp_path_factory.mktemp("runs"), families=("minrnn",))["minrnn"]


@pytest.fixture(scope="module")
def mlflow_run(checkpoint):
    """A real MLflow run (sqlite) made by the platform's own Tracker, pointing at the run dir."""
    from shipyard.export import load_model
    from shipyard.train.tracking import Tracker
    spec = load_model(checkpoint)[1]  # tracking.uri None: the session's embedded sqlite store
    tracker = Tracker(spec, "serve-run-name", str(checkpoint.parent))
    return tracker.run_id, tracker.uri


def test_a_checkpoint_or_run_directory_resolves_to_its_complete_checkpoint(checkpoint):
    for given in (checkpoint, checkpoint.parent):
        target = resolve(str(given))
        assert target.checkpoint == str(checkpoint) and target.run_name == "serve-minrnn"


def test_an_mlflow_run_and_a_registered_model_resolve_to_the_checkpoint(checkpoint, mlflow_run):
    run_id, uri = mlflow_run
    for given in (run_id, run_id[:10], "serve-run-name"):
        target = resolve(given, uri)
        assert (target.checkpoint, target.run_id, target.run_name) == (str(checkpoint), run_id, "serve-run-name")
    from shipyard.train.tracking import client
    mlflow = client(uri)
    mlflow.create_registered_model("serve-registered")
    for _ in range(2):  # as a sweep registers its best trial
        mlflow.create_model_version("serve-registered", source=f"runs:/{run_id}/best_model", run_id=run_id,
                                    tags={"shipyard.checkpoint": str(checkpoint), "shipyard.trial_run": run_id})
    for given, version in (("serve-registered", "2"), ("serve-registered/1", "1"),
                           ("models:/serve-registered/latest", "2")):
        target = resolve(given, uri)
        assert target.checkpoint == str(checkpoint) and target.registered_model == f"serve-registered/{version}"
    with pytest.raises(LookupError, match="nor is 'no-such-thing' a checkpoint directory or a registered"):
        resolve("no-such-thing", uri)


def test_config_file_is_a_serve_deploy_config_without_secrets(checkpoint, tmp_path, monkeypatch):
    from ray.serve.schema import ServeDeploySchema
    monkeypatch.delenv(serving.TOKEN_ENV, raising=False)
    out, token = tmp_path / "serve.yaml", "s3cr3t-token-value"
    rc = main(["serve", str(checkpoint.parent), "--config", str(out), "--token", token,
               "--autoscaling", "1:3", "--port", "8123", "--max-tokens", "100"])
    assert rc == 0
    text = out.read_text()
    assert token not in text and serving.token_hash(token) in text
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))  # what `serve deploy` checks
    app = config.applications[0]
    assert app.import_path == "shipyard.serve.app:build_app" and config.http_options.port == 8123
    assert app.args["checkpoint"] == str(checkpoint) and app.args["autoscaling"] == [1, 3]
    from ray._common.utils import import_attr
    builder = import_attr(app.import_path)  # the builder `serve deploy` imports, called with args
    deployment = builder(app.args)
    assert deployment._bound_deployment._deployment_config.autoscaling_config.max_replicas == 3


@pytest.mark.parametrize("argv,words", [
    (["--autoscaling", "3"], "--autoscaling must be MIN:MAX"),
    (["--autoscaling", "3:1"], "autoscaling must be [min_replicas, max_replicas]"),
    (["--max-tokens", "0"], "max_tokens must be an integer >= 1"),
    (["--replicas", "0"], "replicas must be an integer >= 1"),
])
def test_bad_options_are_refused_naming_the_option(checkpoint, tmp_path, capsys, argv, words):
    assert main(["serve", str(checkpoint), "--config", str(tmp_path / "x.yaml"), *argv]) == 2
    assert words in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "x.yaml").exists()


def test_serve_options_refuse_unknown_keys_and_credentials(checkpoint):
    with pytest.raises(ValueError, match="unknown serve option.*replica;"):
        serving.ServeOptions.from_dict({"checkpoint": str(checkpoint), "replica": 2})
    with pytest.raises(ValueError, match="storage must not carry credentials"):
        serving.ServeOptions(checkpoint="s3://b/c", storage={"secret_access_key": "x"})
