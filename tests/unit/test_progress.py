"""The driver's progress output when it is not a terminal (a submitted job's log, CI): plain lines."""
from __future__ import annotations

from pathlib import Path

from shipyard.spec import load_job
from shipyard.train.launch import _Progress

JOB = Path(__file__).resolve().parents[2] / "jobs" / "minrnn" / "stdlib-code.yaml"


def test_plain_lines_say_which_step_the_validation_loss_is_from(capsys):
    progress = _Progress(load_job(JOB, ["train.steps=3"]), quiet=False)
    progress.update({"step": 1, "train/loss": 2.5, "val/loss": 3.25, "samples_per_s": 10.0})
    progress.update({"step": 2, "train/loss": 2.0})  # within 10 s of the last line: not printed
    progress.update({"step": 3, "train/loss": 1.5})  # the last step always is
    progress.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert lines == ["step 1/3  loss 2.5000  val 3.2500 (step 1)  samples/s 10.0",
                     "step 3/3  loss 1.5000  val 3.2500 (step 1)  samples/s 10.0"]
