"""The scheduler API: torch-free, file based, resources and machine checks."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest

from asam_tune import api
from asam_tune.errors import FingerprintMismatchError, RecordError, UserInputError
from asam_tune.records import dump_record
from tests.fixtures.costmodel_profiles import affine, cpu_only_profile, fingerprint, gpu_with_cpu, profile

MIB = 2**20


@pytest.fixture
def profile_path(tmp_path):
    path = tmp_path / "profile.json"
    dump_record(gpu_with_cpu(), path)
    return path


def _same(a, b) -> bool:
    return a.model_copy(update={"created_at": ""}) == b.model_copy(update={"created_at": ""})


def test_all_is_the_public_surface():
    for name in api.__all__:
        assert hasattr(api, name)


def test_plan_for_takes_a_profile_or_its_path(profile_path):
    assert _same(api.plan_for(profile_path, 100), api.plan_for(gpu_with_cpu(), 100))
    assert _same(api.plan_for(str(profile_path), 100), api.plan_for(gpu_with_cpu(), 100))
    with pytest.raises(UserInputError, match="int"):
        api.plan_for(42, 100)


def test_save_and_load_plan(tmp_path, profile_path):
    plan = api.plan_for(profile_path, 100, reserved_cores=1)
    api.save_plan(plan, tmp_path / "sub" / "plan.json")
    assert api.load_plan(tmp_path / "sub" / "plan.json") == plan
    with pytest.raises(UserInputError, match="Profile"):
        api.save_plan(gpu_with_cpu(), tmp_path / "x.json")


def test_loading_a_missing_file_names_it(tmp_path):
    with pytest.raises(RecordError, match="nothing.json"):
        api.load_profile(tmp_path / "nothing.json")
    with pytest.raises(RecordError, match="nothing.json"):
        api.load_plan(tmp_path / "nothing.json")


def test_a_profile_is_not_a_plan(profile_path):
    with pytest.raises(RecordError, match=r"\$.kind|\$.created_at|extra"):
        api.load_plan(profile_path)


def test_resources_of_a_gpu_plan_with_a_cpu_worker():
    plan = api.plan_for(gpu_with_cpu(), 100, reserved_cores=2, min_perturbation_fraction=None)
    # 8 cores - 1 main - 2 reserved = 5: cpu/4t, b_p 17 (no quality floor).
    assert (plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/4t", 17)
    # 512 MiB process + 4 copies of 4 MB parameters + 17 samples * 40 floats * 4 B * 256.
    memory = 512 * MIB + 4 * 4_000_000 + 17 * 160 * 256
    assert api.resources(plan) == {
        "nproc_per_node": 1, "gpus": 1, "gpus_per_rank": 1,
        "cpu_cores": 1 + 2 + 4, "cpu_cores_per_rank": 7, "worker_cores_per_rank": 4,
        "host_memory_bytes": memory, "host_memory_bytes_per_rank": memory,
        "perturbation_device": "cpu/4t", "mode": "staleness1",
    }


def test_resources_multiply_by_ranks():
    plan = api.plan_for(gpu_with_cpu(cores=16), 100, nproc_per_node=2)
    # 8 cores per rank, 1 main: cpu/4t.
    needs = api.resources(plan)
    assert (needs["gpus"], needs["cpu_cores"], needs["cpu_cores_per_rank"]) == (2, 10, 5)
    assert needs["host_memory_bytes"] == 2 * needs["host_memory_bytes_per_rank"] > 0


def test_resources_of_a_second_gpu_and_of_synchronous_sam():
    devices = [affine("cuda:0", 0.01, 0.0001), affine("cuda:1", 0.001, 0.0001)]
    other = api.resources(api.plan_for(profile(*devices), 100, main_device="cuda:0"))
    assert (other["gpus"], other["cpu_cores"], other["host_memory_bytes"]) == (2, 1, 0)
    synchronous = api.resources(api.plan_for(gpu_with_cpu(cores=1), 100))
    assert (synchronous["gpus"], synchronous["cpu_cores"], synchronous["worker_cores_per_rank"]) == (1, 1, 0)
    assert synchronous["mode"] == "synchronous"


def test_resources_of_a_cpu_only_split():
    needs = api.resources(api.plan_for(cpu_only_profile(), 64))
    assert (needs["gpus"], needs["cpu_cores"], needs["worker_cores_per_rank"]) == (0, 8, 4)


def test_cpus_needed_through_the_api(profile_path):
    need = api.cpus_needed(profile_path, 100, min_perturbation_batch=5)
    assert need.as_dict() == {"worker_cores": 2, "cores_per_rank": 3, "perturbation_batch_size": 8,
                              "perturbation_device": "cpu/2t", "main_device": "cuda:0",
                              "explanation": need.explanation, "feasible": True}
    with pytest.raises(UserInputError, match="min_perturbation_batch: 0"):
        api.cpus_needed(profile_path, 100, min_perturbation_batch=0)
    with pytest.raises(UserInputError, match="min_perturbation_batch: 101"):
        api.cpus_needed(profile_path, 100, min_perturbation_batch=101)


def test_check_machine_same_machine_is_silent():
    plan = api.plan_for(gpu_with_cpu(), 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert api.check_machine(plan, current=plan.profile_fingerprint) == []


def test_check_machine_refuses_another_machine_unless_allowed():
    plan = api.plan_for(gpu_with_cpu(), 100)
    other = fingerprint(cores=16, gpus=1)
    with pytest.raises(FingerprintMismatchError, match="usable cores: 8 != 16"):
        api.check_machine(plan, current=other)
    with pytest.warns(UserWarning, match="usable cores: 8 != 16"):
        assert api.check_machine(plan, current=other, allow_other_machine=True) == ["usable cores: 8 != 16"]
    with pytest.raises(FingerprintMismatchError, match="profile"):
        api.check_machine(gpu_with_cpu(), current=other)
    with pytest.raises(UserInputError, match="dict"):
        api.check_machine({}, current=other)


def test_check_machine_collects_this_machine_by_default(monkeypatch):
    import asam_tune.fingerprint

    plan = api.plan_for(gpu_with_cpu(), 100)
    monkeypatch.setattr(asam_tune.fingerprint, "collect_fingerprint", lambda: fingerprint(cores=3, gpus=1))
    with pytest.raises(FingerprintMismatchError, match="usable cores: 8 != 3"):
        api.check_machine(plan)


@pytest.mark.process
@pytest.mark.timeout(60)
def test_the_scheduler_api_imports_no_torch(tmp_path, profile_path):
    script = textwrap.dedent(f"""
        import sys
        import asam_tune.api as api
        profile = api.load_profile({str(profile_path)!r})
        plan = api.plan_for(profile, 100)
        api.save_plan(plan, {str(tmp_path / "plan.json")!r})
        plan = api.load_plan({str(tmp_path / "plan.json")!r})
        need = api.cpus_needed({str(profile_path)!r}, 100)
        api.resources(plan)
        api.check_machine(plan, current=plan.profile_fingerprint)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            api.check_machine(plan, allow_other_machine=True)  # probes this machine
        assert need.feasible and plan.mode == "staleness1", (need, plan.mode)
        torch_modules = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("torch modules:", torch_modules)
        sys.exit(1 if torch_modules else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch modules: []" in result.stdout


def test_ray_resources_per_worker_uses_rays_keys():
    from asam_tune import api
    from tests.fixtures.costmodel_profiles import gpu_with_cpu

    plan = api.plan_for(gpu_with_cpu(), 100)
    need = api.resources(plan)
    assert api.ray_resources_per_worker(plan) == {"CPU": need["cpu_cores_per_rank"], "GPU": need["gpus_per_rank"]}
    assert api.ray_resources_per_worker(plan)["GPU"] == 1
