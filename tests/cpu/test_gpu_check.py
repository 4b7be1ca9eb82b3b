"""The prepared GPU check's code, run on the CPU (``--dry-run``): the stream worker through the
recording fake CUDA layer, bf16 ascent, the MNIST-1D run, the NVTX trace step, the budget."""
from __future__ import annotations

import json

import pytest
import torch

from asam_tune.bench import gpu_check

pytestmark = [pytest.mark.timeout(240)]
CPU = torch.device("cpu")


def test_the_stream_variants_run_on_the_cpu_through_the_fake_layer():
    result = gpu_check.measure_stream_variants("mnist1d-cnn", 16, CPU, steps=3, warmup=1)
    assert result["perturbation_batch_size"] == 8
    for name in ("stream", "stream-bf16"):
        assert result[name]["steps"] == 3 and result[name]["fallbacks"] == 0
        assert result[name]["staleness_histogram"] and result[name]["over_sgd"] > 0
        assert result[name]["peak_memory_bytes"] is None  # measured on a GPU only
    table = gpu_check.markdown({**_document(), "stream": [result]})
    assert "| mnist1d-cnn | 16 | stream-bf16 | 8 |" in table


def test_the_accuracy_run_trains_with_the_stream_worker_on_the_main_device():
    rows = gpu_check.accuracy_run(CPU, epochs=1, methods=("asam-stream",))
    assert [r["method"] for r in rows] == ["asam-stream"] and rows[0]["device"] == "cpu"
    assert rows[0]["steps"] == 40 and 0.1 < rows[0]["test_accuracy"] <= 1.0


def test_the_trace_step_runs_with_nvtx_on_and_says_why_there_is_no_trace(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    trace = gpu_check.record_trace(tmp_path, CPU, gpu_check.Budget(60))
    assert trace["nsys"] is None and "nsys not found" in trace["note"]
    assert trace["steps"] == 5 and trace["fallbacks"] == 0


@pytest.mark.process
def test_a_dry_run_past_its_budget_skips_phases_and_still_writes_its_results(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--budget-s", "1"]) == 0
    document = json.loads((tmp_path / "gpu-check.json").read_text())
    assert document["dry_run"] is True and document["device"] == "cpu"
    assert any(s.startswith("profile of mnist1d-cnn") for s in document["skipped"])
    assert any(s.startswith("the MNIST-1D run") for s in document["skipped"])
    assert document["trace"]["steps"] == 5  # the trace step needs no budget without nsys
    assert "Skipped (out of time): profile of mnist1d-cnn" in (tmp_path / "gpu-check.md").read_text()


def test_a_missing_gpu_is_one_line_and_exit_code_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cuda:0"]) == 2
    assert "--dry-run" in capsys.readouterr().err


def _document() -> dict:
    from asam_tune.bench.provenance import provenance

    return {**provenance(), "dry_run": True, "device": "cpu", "command": "python -m asam_tune.bench.gpu_check",
            "load_average": [0.0, 0.0, 0.0], "speed": [], "stream": [], "accuracy": [], "trace": None,
            "verdicts": {}, "skipped": []}


@pytest.mark.process
def test_the_handover_cost_bench_measures_its_modes(tmp_path, monkeypatch):
    from asam_tune.bench import handover_cost

    assert handover_cost.MODES == ("inline", "copy-stream", "issue-only", "cpu-main")
    monkeypatch.setattr(handover_cost, "MODES", ("inline", "issue-only"))  # a worker start each: two suffice
    out = tmp_path / "cost.json"
    assert handover_cost.main(["--workloads", "mnist1d-cnn", "--samples", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["results"]] == ["inline", "issue-only"]
    assert all(r["main_median_s"] > 0 and r["parameter_bytes"] > 0 for r in result["results"])
    assert len(result["load_average_before"]) == 3


def test_the_ascent_dtype_goes_to_the_first_cases_profile_only_and_a_bad_one_is_one_line(tmp_path, capsys,
                                                                                        monkeypatch):
    import asam_tune.profiler as profiler

    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--ascent-dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown ascent dtype 'fp8'" in err[0]
    seen = []

    class Stop(Exception):
        pass

    def fake_run_profile(workload, **kwargs):
        seen.append((workload, kwargs["ascent_dtype"]))
        raise Stop

    monkeypatch.setattr(profiler, "run_profile", fake_run_profile)
    monkeypatch.setattr(gpu_check, "DRY_RUN_CASES", (("mnist1d-cnn", (32,)), ("resnet20", (32,))))
    with pytest.raises(Stop):
        gpu_check.main(["--out", str(tmp_path), "--dry-run", "--ascent-dtype", "bf16"])
    assert seen == [("mnist1d-cnn", "bfloat16")]
