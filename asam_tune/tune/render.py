"""Rich tables for a tuning record (no torch): the outcome, predicted vs measured, the Pareto
front, the confirmation of the finalists (when there was one) and every trial. ``asam-tune
show`` calls ``render_tuning`` for documents whose ``kind`` is ``"asam-tune-tuning"``."""
from __future__ import annotations

from rich.table import Table

from asam_tune.records.tuning import ConfirmationLog, TrialLog, Tuning


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def _config(t: TrialLog | ConfirmationLog | None) -> str:
    if t is None or t.perturbation is None:
        return "-"
    worker = f"cpu/{t.worker_threads}t" if t.worker_threads else t.perturbation
    return f"main {t.main_threads}t + {worker}" if t.main_threads else worker


def _summary(record: Tuning) -> Table:
    states = [t.state for t in record.trials]
    table = Table(title="Tuning", show_header=False)
    table.add_row("workload", f"{record.workload.name} at batch size {record.batch_size} on {record.main_device}")
    table.add_row("trials", f"{len(states)}: {states.count('complete')} complete, {states.count('fail')} failed"
                            + (f", {len(states) - states.count('complete') - states.count('fail')} other"
                               if len(states) > states.count('complete') + states.count('fail') else ""))
    table.add_row("each trial", _trial_length(record))
    if record.confirm_rounds is not None:
        table.add_row("confirmation", _confirmation_summary(record))
    table.add_row("baseline", f"SGD {_ms(record.baseline.sgd_step_s)} ms, SAM {_ms(record.baseline.sam_step_s)} ms "
                              f"({record.baseline.placement})")
    table.add_row("margin", f"{record.margin:.0%}")
    table.add_row("study", f"{record.study_name} in {record.storage}")
    table.add_row("verdict", record.verdict)
    return table


def _trial_length(record: Tuning) -> str:
    text = f"{record.steps_per_trial} timed steps"
    if record.min_trial_seconds:
        text = f"at least {text} and {record.min_trial_seconds:g} s of them"
    return f"{text} after {record.warmup_steps} warm-up"


def _confirmation_summary(record: Tuning) -> str:
    if record.confirm_rounds == 0:
        return "off: each configuration was judged on its trial's window"
    if not record.confirmation:
        return f"{record.confirm_rounds} round(s) asked for; nothing to confirm (no choice)"
    failed = sum(c.error is not None for c in record.confirmation)
    return (f"{record.confirm_rounds} round(s) of {len(record.confirmation)} finalist(s) in alternation"
            + (f", {failed} failed" if failed else ""))


def _hidden_fraction(record: Tuning, t: TrialLog | ConfirmationLog | None) -> str:
    """(T_SAM - T_ASAM) / (T_SAM - T_SGD) with the measured baseline: 1 = SGD's cost, 0 = SAM's."""
    sgd, sam = record.baseline.sgd_step_s, record.baseline.sam_step_s
    if t is None or t.step_time_s is None or sam <= sgd:
        return "-"
    return f"{(sam - t.step_time_s) / (sam - sgd):.2f}"


def _measured(record: Tuning, number: int | None) -> TrialLog | ConfirmationLog | None:
    """A confirmed finalist's pooled values (the tuned plan's), else the trial's own window."""
    return record.confirmed(number) or record.trial(number)


def _comparison(record: Tuning) -> Table:
    p, base = record.predicted, record.baseline
    planned, chosen = _measured(record, record.planned_trial), _measured(record, record.chosen_trial)
    table = Table(title="Predicted vs measured")
    for column in ("", "plan (predicted)", "plan (measured)", "tuned (measured)"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row("configuration", "", _config(planned), _config(chosen))
    table.add_row("b_p", "", *(str(t.perturbation_batch_size) if t and t.perturbation_batch_size else "-"
                               for t in (planned, chosen)))
    table.add_row("SGD step ms", _ms(p.sgd_step_s), _ms(base.sgd_step_s), _ms(base.sgd_step_s))
    table.add_row("SAM step ms", _ms(p.sam_step_s), _ms(base.sam_step_s), _ms(base.sam_step_s))
    table.add_row("asynchronous SAM step ms", _ms(p.asam_step_s), _ms(planned.step_time_s if planned else None),
                  _ms(chosen.step_time_s if chosen else None))
    table.add_row("x SGD", f"{p.asam_step_s / p.sgd_step_s:.2f}",
                  *(f"{t.step_time_s / base.sgd_step_s:.2f}" if t and t.step_time_s else "-"
                    for t in (planned, chosen)))
    table.add_row("perturbation ms", _ms(p.perturbation_time_s), _ms(planned.worker_time_s if planned else None),
                  _ms(chosen.worker_time_s if chosen else None))
    table.add_row("main waited ms/step", "", _ms(planned.wait_s if planned else None),
                  _ms(chosen.wait_s if chosen else None))
    table.add_row("hidden fraction", f"{p.hidden_fraction:.2f}",
                  *(_hidden_fraction(record, t) for t in (planned, chosen)))
    table.add_row("waited within margin", "", _yes(planned.hidden if planned else None),
                  _yes(chosen.hidden if chosen else None))
    if isinstance(planned, TrialLog) and planned.state == "fail":
        table.caption = f"the plan's own configuration failed: {planned.error}"
    elif record.confirmation:
        table.caption = "measured: pooled over the trial and its confirmation windows where it was a finalist"
    return table


def _front(record: Tuning) -> Table:
    table = Table(title="Pareto front: step time vs b_p (hidden configurations)")
    for column in ("trial", "configuration", "b_p", "step ms", "x SGD", "within margin", ""):
        table.add_column(column, justify="left" if column in ("configuration", "") else "right")
    for t in sorted((t for t in record.trials if t.pareto), key=lambda t: t.perturbation_batch_size):
        table.add_row(str(t.number), _config(t), str(t.perturbation_batch_size), _ms(t.step_time_s),
                      f"{t.step_time_s / record.baseline.sgd_step_s:.2f}", _yes(t.within_margin),
                      "chosen" if t.number == record.chosen_trial else "")
    return table


_ROLES = {"study_choice": "study's choice", "cost_model": "cost model", "larger_b_p": "next larger b_p"}


def _confirmation(record: Tuning) -> Table:
    table = Table(title=f"Confirmation: the finalists measured again in alternation ({record.confirm_rounds} "
                        f"round(s))", caption="step ms per window; pooled: medians over the trial and its rounds")
    for column in ("trial", "finalist as", "configuration", "b_p", "trial ms", "rounds ms", "pooled ms", "x SGD",
                   "waited ms", "hidden", "within margin", "note"):
        table.add_column(column, justify="left" if column in ("finalist as", "configuration", "rounds ms",
                                                              "note") else "right")
    for c in record.confirmation:
        trial = record.trial(c.trial)
        rounds = " / ".join(_ms(r.step_time_s) for r in c.rounds) or "-"
        ratio = f"{c.step_time_s / record.baseline.sgd_step_s:.2f}" if c.step_time_s else "-"
        note = "chosen" if c.trial == record.chosen_trial and c.error is None else ""
        if c.error:
            note = f"dropped: {c.error}"
        table.add_row(str(c.trial), ", ".join(_ROLES[r] for r in c.roles), _config(c), str(c.perturbation_batch_size),
                      _ms(trial.step_time_s if trial else None), rounds, _ms(c.step_time_s), ratio, _ms(c.wait_s),
                      _yes(c.hidden), _yes(c.within_margin), note)
    return table


def _trials(record: Tuning) -> Table:
    table = Table(title="Trials")
    for column in ("#", "state", "configuration", "b_p", "step ms", "x SGD", "waited ms", "worker ms", "steps",
                   "hidden", "within margin", "note"):
        table.add_column(column, justify="left" if column in ("state", "configuration", "note") else "right")
    for t in record.trials:
        notes = [n for n, on in (("cost model", t.from_cost_model), ("front", t.pareto),
                                 ("chosen", t.number == record.chosen_trial)) if on]
        if t.error:
            notes.append(t.error)
        ratio = f"{t.step_time_s / record.baseline.sgd_step_s:.2f}" if t.step_time_s else "-"
        table.add_row(str(t.number), t.state, _config(t), str(t.perturbation_batch_size or "-"), _ms(t.step_time_s),
                      ratio, _ms(t.wait_s), _ms(t.worker_time_s), str(t.steps or "-"), _yes(t.hidden),
                      _yes(t.within_margin),
                      "; ".join(notes))
    return table


def render_tuning(record: Tuning) -> list[Table]:
    tables = [_summary(record), _comparison(record)]
    if any(t.pareto for t in record.trials):
        tables.append(_front(record))
    if record.confirmation:
        tables.append(_confirmation(record))
    tables.append(_trials(record))
    return tables
