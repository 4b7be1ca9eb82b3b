"""The remedy ranking and the targets as markdown."""
from __future__ import annotations


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    rule = report["rule"]
    cap = "no cap" if rule["max_factor"] is None else f"cap {rule['max_factor']:.2f}"
    lines = [f"## What keeps SAM's gain on a worker budget of beta = {report['beta']} of the batch per main step", "",
             f"Machine: {report['machine']['cpu']}; {report['date']}; commit {report['commit']}. Rule: exponent "
             f"{rule['exponent']:.3f}, {cap}. Costs are modelled (SGD step = 1.00); accuracies measured (test split, "
             f"3 seeds unless stated). Candidates that keep >= {report['gain_target']:.0%} of SAM's gain come first, "
             "cheapest first; then the rest by gain. Pareto: no other candidate is both cheaper and better.", ""]
    for name, w in report["workloads"].items():
        lines += [f"### {name}", "", f"SGD {_pct(w['sgd_test_mean'])} %, SAM {_pct(w['sam_test_mean'])} %.", "",
                  "| rank | candidate | family | test % (mean ± sd) | gain | modelled cost | Pareto | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(w["ranking"], 1):
            lines.append(f"| {i} | {r['candidate']} | {r['family']} | {_pct(r['test_mean'])} ± {_pct(r['test_sd'])} | "
                         f"{_num(r['gain_fraction'])} | {_num(r['cost'])} | {'yes' if r['pareto'] else ''} | {r['note']} |")
        t = w["targets"]
        lines += ["", f"Targets for a main device {1 / eval(t['target_beta']):.0f}x faster than one CPU core: the "
                  f"budget hides b_p={t['hidden_b_p']}; with the floor "
                  f"{'none' if t['floor_fraction'] is None else format(t['floor_fraction'], '.3g')} the planner picks "
                  f"b_p={t['chosen_b_p']} (modelled cost {t['modelled_cost']:.2f} against SAM's {t['sam_cost']:.2f}).", ""]
        if not t["measured"]:
            lines.append(f"- {t['verdict']}")
        else:
            lines.append(f"- accuracy at the rule's rho {t['rule_rho']:g}: {_pct(t['test_mean'])} ± {_pct(t['test_sd'])} %, "
                         f"gain {t['gain_fraction']:.2f}; target {_pct(t['threshold'])} %: "
                         f"**{'met' if t['reaches'] else 'missed'}**; cheaper than SAM: "
                         f"**{'yes' if t['cheaper_than_sam'] else 'no'}**.")
            for k, l in t.get("looksam", {}).items():
                lines.append(f"- against `{k}` at equal accuracy ({_pct(l['level'])} %): "
                             f"{_num(l['async_sgd_steps_to_level'], '.0f')} SGD steps (modelled) against LookSAM's "
                             f"{_num(l['looksam_sgd_steps_to_level'], '.0f')} (its step modelled at "
                             f"{l['looksam_modelled_step_ratio']:.2f}x SGD's): **{'cheaper' if l['cheaper'] else 'not cheaper'}**; "
                             f"with LookSAM's step as measured here ({l['looksam_measured_step_ratio']:.2f}x SGD's, "
                             f"{_num(l['looksam_sgd_steps_to_level_measured'], '.0f')} SGD steps): "
                             f"{'cheaper' if l['cheaper_than_measured'] else 'not cheaper'}.")
        lines.append("")
    return "\n".join(lines) + "\n"


__all__ = ["markdown"]
