"""Numbers a plan cannot honestly carry, and the busy flag of the profile behind them (no torch).

A machine busy with another job while it was profiled inflates some points and not others (up
to 500x on 2 cores), and a plan made from them can predict asynchronous SAM faster than SGD:
impossible, since the main step alone is an SGD step (a hidden fraction above 1). Predictions are
checked where they are made:

- asynchronous SAM faster than SGD beyond noise (hidden fraction above 1): impossible. The
  planner refuses (``ImplausiblePlanError``) when the profile was measured on a busy machine,
  the likely cause; otherwise it warns (a contention or handover measurement below its true
  value can do it too) and the plan notes it;
- asynchronous SAM slower than SAM beyond noise (hidden fraction below 0) in an asynchronous
  plan: possible only when asked for (``asynchronous=True``): a warning.

"Beyond noise": by more than the predictions' own spreads added (from the profile's
interquartile ranges), and at least ``EQUIVALENT_SHARE`` of SGD's step.
"""
from __future__ import annotations

from dataclasses import dataclass

from asam_tune.errors import UserInputError
from asam_tune.profiler.machine_load import end_warning, start_warning
from asam_tune.records.plan import ProfileLoad
from asam_tune.records.profile import LoadAverages, MachineLoad, Profile

# Closer than this share of SGD's step is within what profiles measure reliably.
EQUIVALENT_SHARE = 0.03


class ImplausiblePlanError(UserInputError):
    """The plan's predictions are impossible, and the profile says why (a busy machine)."""


def _loads(loads: LoadAverages | None) -> str:
    return "unknown" if loads is None else " ".join(f"{x:.2f}" for x in loads)


def load_summary(load: MachineLoad | None) -> tuple[bool | None, str]:
    """Whether the machine was busy while profiled, and one line that says how busy."""
    if load is None:
        return None, "not recorded (a profile written before asam-tune recorded the machine's load)"
    line = (f"{_loads(load.start)} -> {_loads(load.end)} (1/5/15-min load averages, start -> end) on "
            f"{load.usable_cores} usable core{'s' if load.usable_cores != 1 else ''}")
    busy = [moment for moment, warning in (("start", start_warning(load.start, load.usable_cores)),
                                           ("end", end_warning(load))) if warning]
    if busy:
        return True, line + f"; BUSY at the {' and the '.join(busy)}: another job ran, timings may be inflated"
    return False, line


def profile_load(profile: Profile) -> ProfileLoad:
    busy, summary = load_summary(profile.machine_load)
    return ProfileLoad(busy=busy, summary=summary, machine_load=profile.machine_load)


@dataclass(frozen=True)
class Finding:
    impossible: bool  # False: merely suspicious (slower than SAM, as asked for)
    refuse: bool
    message: str  # one line


def findings(*, sgd_step_s: float, sam_step_s: float, asam_step_s: float, asam_uncertainty_s: float,
             sgd_uncertainty_s: float, busy: bool | None) -> list[Finding]:
    """What is impossible or suspicious about an asynchronous plan's predicted step."""
    noise = max(asam_uncertainty_s + sgd_uncertainty_s, EQUIVALENT_SHARE * sgd_step_s)
    extra = sam_step_s - sgd_step_s
    hidden = (sam_step_s - asam_step_s) / extra if extra > 0 else 0.0
    result = []
    if asam_step_s < sgd_step_s - noise:
        cause = ("the profile was measured on a busy machine: profile again on an idle one" if busy else
                 "a measured contention, handover or baseline point is probably off: profile again")
        result.append(Finding(True, bool(busy), f"impossible prediction: asynchronous SAM {asam_step_s * 1e3:.3g} ms per "
                                          f"step is faster than SGD's {sgd_step_s * 1e3:.3g} ms (hidden fraction "
                                          f"{hidden:.2f} > 1); {cause}"))
    if asam_step_s > sam_step_s + noise:
        result.append(Finding(False, False, f"asynchronous SAM is predicted slower than synchronous SAM ({asam_step_s * 1e3:.3g} "
                                     f"against {sam_step_s * 1e3:.3g} ms, hidden fraction {hidden:.2f} < 0)"))
    return result
