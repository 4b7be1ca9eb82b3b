"""Ray Train: docs/examples/ray_train.py (the docs' example) on a local Ray with 2 CPUs, and placement()."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.train.torch")

from asam_tune.errors import UserInputError  # noqa: E402
from asam_tune.integrations import ray as ray_integration  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "ray_train.py"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.process
@pytest.mark.timeout(400)
def test_the_docs_example_runs_as_copied_and_leaves_nothing_behind(tmp_path):
    shm_before = set(os.listdir("/dev/shm"))
    # Run as a user would: a fresh interpreter, from another directory, the model defined in __main__.
    result = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=380, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    lines = [line.split("asam-tune stats:", 1)[1] for line in output.splitlines() if "asam-tune stats:" in line]
    assert lines, output[-3000:]
    stats = json.loads(lines[0])
    assert stats["fallbacks"] == 0
    assert stats["staleness"] == {"0": 1, "1": 199}  # only the first step has no step before it
    assert stats["main_threads"] == 1 and stats["worker_threads"] == 1  # 2 CPUs: one each, not 2 + 1
    assert not _alive(stats["worker_pid"]) and not _alive(stats["rank_pid"])
    pids = (stats["worker_pid"], stats["rank_pid"])
    left = [name for name in set(os.listdir("/dev/shm")) - shm_before if any(f"_{pid}_" in name for pid in pids)]
    assert left == []


def test_placement_outside_ray_names_the_problem():
    import ray

    if ray.is_initialized():
        pytest.skip("Ray is running in this process")
    with pytest.raises(UserInputError, match="inside a Ray Train worker"):
        ray_integration.placement(perturbation_device="cpu")


def test_a_relative_plan_path_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError, match="relative.*load the plan in the driver"):
        ray_integration._plan_settings("plan.json")


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "asam_tune.integrations.ray")
    with pytest.raises(ImportError, match=r'pip install "asam-tune\[ray\]"'):
        importlib.import_module("asam_tune.integrations.ray")


def test_the_docs_show_the_example_verbatim():
    docs = (EXAMPLE.parents[1] / "cluster.md").read_text()
    assert "```python\n" + EXAMPLE.read_text() + "```" in docs
