"""Measured refinement of a plan (``asam-tune tune``): an Optuna study of short trials.

Torch-free except ``WorkloadTrialRunner`` (loaded on first use), which runs the trials::

    from asam_tune.tune import SearchSpace, run_study, tuned_plan
    space = SearchSpace.from_plan(plan, usable_cores=16)
    with WorkloadTrialRunner(workload, plan, space, usable_core_ids) as runner:
        result = run_study(space, runner, margin=0.05, n_trials=20, storage="sqlite:///tune.db",
                           planned=space.planned_config(plan))
"""
from __future__ import annotations

from asam_tune.tune.render import render_tuning
from asam_tune.tune.result import tuned_plan, tuning_record
from asam_tune.tune.selection import Choice, Measurement, Outcome, choose, pareto_front
from asam_tune.tune.space import SearchSpace, TrialConfig
from asam_tune.tune.study import Baseline, StudyResult, TrialRunner, run_study

__all__ = [
    "Baseline", "Choice", "Measurement", "Outcome", "SearchSpace", "StudyResult", "TrialConfig", "TrialRunner",
    "WorkloadTrialRunner", "choose", "pareto_front", "render_tuning", "run_study", "tuned_plan", "tuning_record",
]


def __getattr__(name: str):
    if name == "WorkloadTrialRunner":
        from asam_tune.tune.trial import WorkloadTrialRunner

        return WorkloadTrialRunner
    raise AttributeError(f"module 'asam_tune.tune' has no attribute {name!r}")
