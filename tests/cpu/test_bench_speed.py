"""The speed benchmark compares its SGD baseline with the profile's and says when they disagree,
and names another asam-tune job (a real, short run; the checks are on a prediction made absurd
on purpose and a fake job list, not on a timing)."""
from __future__ import annotations

from pathlib import Path

import pytest

from asam_tune.bench.speed import markdown, run_speed_bench
from asam_tune.records import Plan, load_record

PLAN = Path(__file__).resolve().parents[2] / "docs" / "results" / "plan-mnist1d-cnn-b100-asynchronous.json"


@pytest.mark.process
@pytest.mark.timeout(240)
def test_the_speed_bench_warns_when_sgd_is_far_from_the_profile_or_another_job_runs(monkeypatch):
    from asam_tune.bench import speed
    from asam_tune.profiler.busy import OtherJob

    monkeypatch.setattr(speed, "asam_tune_jobs", lambda: (OtherJob(200, "asam-tune profile -o b.json"),))
    plan = load_record(Plan, PLAN)
    # A profile that promised SGD in a microsecond: no machine measures that.
    predictions = plan.predictions.model_copy(update={"sgd_step_s": 1e-6})
    plan = plan.model_copy(update={"predictions": predictions, "batch_size": 16, "perturbation_batch_size": 4})
    result = run_speed_bench("mnist1d-cnn", plan, steps=3, warmup=1)
    assert any(w.startswith("SGD's step measured") and "busier" in w for w in result["warnings"])
    assert result["warnings"][0] == ("another asam-tune job ran beside the benchmark (pid 200: asam-tune profile "
                                     "-o b.json): its times are inflated")
    assert result["load_average"]["end"] is None or len(result["load_average"]["end"]) == 3
    text = markdown(result)
    assert "Warning: SGD's step measured" in text and "1-minute load average" in text
