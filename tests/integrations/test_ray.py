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


class _Context:
    def __init__(self, cpus):
        self.cpus = cpus

    def get_assigned_resources(self):
        return {"CPU": self.cpus}


@pytest.fixture
def ray_worker(monkeypatch):
    """This process as a Ray worker that was given ``cpus`` CPUs; torch's thread count restored after."""
    import ray
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setattr(ray, "is_initialized", lambda: True)

    def given(cpus):
        monkeypatch.setattr(ray, "get_runtime_context", lambda: _Context(cpus))

    yield given
    torch.set_num_threads(threads)


def test_placement_splits_rays_cpus_and_stays_inside_the_mask(ray_worker):
    import torch

    mask = sorted(os.sched_getaffinity(0))
    ray_worker(len(mask))
    if len(mask) < 2:
        pytest.skip("needs 2 usable cores")
    assert ray_integration.placement(perturbation_device="cpu") == {"threads": 1, "cores": tuple(mask)}
    assert torch.get_num_threads() == len(mask) - 1
    # More CPUs than the mask holds: the mask wins. A GPU worker gets no threads or cores.
    ray_worker(len(mask) + 8)
    assert ray_integration.assigned_cpus() == len(mask)
    ray_worker(1.5)
    with pytest.raises(UserInputError, match="too few for a CPU perturbation worker"):
        ray_integration.placement(perturbation_device="cpu")


def test_placement_follows_a_plans_worker_threads_and_reserve(ray_worker, monkeypatch):
    import torch

    from asam_tune import api
    from tests.fixtures.costmodel_profiles import gpu_with_cpu

    plan = api.plan_for(gpu_with_cpu(), 100)
    assert plan.perturbation.device == "cpu"
    need = api.ray_resources_per_worker(plan)["CPU"]
    monkeypatch.setattr(ray_integration, "_allowed", lambda: list(range(10, 10 + need)))  # a Ray worker's mask
    ray_worker(need)
    options = ray_integration.placement(plan)
    assert options == {"threads": plan.perturbation.threads, "cores": tuple(range(10, 10 + need))}
    assert torch.get_num_threads() == need - plan.reserved_cores - plan.perturbation.threads
