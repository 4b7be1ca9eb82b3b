"""The README's training-loop snippet runs as copied: saved as a script and run with python, beside
the plan the README's first command writes (made here from a profile of this machine)."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from asam_tune.costmodel.planner import make_plan
from asam_tune.fingerprint import collect_fingerprint, usable_core_ids
from asam_tune.records import dump_record
from asam_tune.affinity import can_pin
from asam_tune.workloads import describe, load_workload
from tests.fixtures.costmodel_profiles import cpu_only_profile

README = Path(__file__).resolve().parents[2] / "README.md"
ROOT = README.parent


def readme_snippet(heading: str) -> str:
    """The first python block under ``heading`` in the README."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _plan_like_command_1(folder: Path) -> None:
    """runs/plan.json for the built-in MNIST-1D CNN at batch 100, made on this machine."""
    workload = load_workload("mnist1d-cnn")
    machine = cpu_only_profile({1: 0.008, 2: 0.0045}, cores=2).model_copy(
        update={"fingerprint": collect_fingerprint(), "workload": describe(workload, workload.build())})
    plan = make_plan(machine, 100, main_device="cpu/1t", asynchronous=True)
    dump_record(plan, folder / "runs" / "plan.json")


def test_the_snippet_has_the_main_guard():
    snippet = readme_snippet("## Using it in a training loop")
    assert 'if __name__ == "__main__":' in snippet
    assert "main_process_placement(PLAN)" in snippet and "AsyncSAM(" in snippet


@pytest.mark.process
@pytest.mark.timeout(300)
def test_the_training_loop_snippet_runs_as_a_script(tmp_path):
    if not can_pin() or len(usable_core_ids()) < 2:
        pytest.skip("the README's plan puts the main process and the worker on two cores")
    _plan_like_command_1(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(readme_snippet("## Using it in a training loop"), encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=280, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split(":")[0] for line in result.stdout.splitlines()[:3]] == ["epoch 0", "epoch 1", "epoch 2"]
    histogram = ast.literal_eval(re.search(r"staleness_histogram=(\{.*?\})", result.stdout).group(1))
    assert histogram.get(1, 0) > 0 and "fallbacks=0" in result.stdout  # the worker's results were used
