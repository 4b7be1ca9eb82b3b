"""The cost model: fit device time curves from a profile and plan the perturbation (no torch)."""
from asam_tune.costmodel.cpus import CpuRequirement, cpus_needed
from asam_tune.costmodel.curves import TimeCurve, fit_time_curve
from asam_tune.costmodel.planner import make_plan

__all__ = ["CpuRequirement", "TimeCurve", "cpus_needed", "fit_time_curve", "make_plan"]
