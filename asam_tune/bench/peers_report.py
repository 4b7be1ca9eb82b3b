"""The peers result as markdown: an accuracy table and a time table, with what each column measures."""
from __future__ import annotations


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1e3 * value:.2f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _rho(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _label(name: str, row: dict, batch_size: int) -> str:
    b_p = row.get("perturbation_batch_size")
    extra = ""
    if row["kind"] in ("asam", "sync", "nonblocking") and b_p is not None:
        extra = f" (b_p={b_p})"
    elif row["kind"] == "split":
        extra = f" (worker {b_p} + main {row['main_ascent_samples']})"
    return f"`{name}`{extra}"


def accuracy_table(result: dict) -> list[str]:
    lines = ["| method | rho | val % | test % (mean ± sd) | per seed | gain vs SGD→SAM | train % (noisy labels) "
             "| flipped labels memorised % |", "|---|---|---|---|---|---|---|---|"]
    for name, row in result["methods"].items():
        seeds = ", ".join(_pct(a) for a in row["test_accuracy"])
        estimate = result["selections"].get(name, {}).get("estimate", {})
        edge = " (edge)" if estimate.get("at_edge") else ""
        val = sum(row["val_accuracy"]) / len(row["val_accuracy"])
        gain = row.get("gain_fraction")
        lines.append(f"| {_label(name, row, result['batch_size'])} | {_rho(row['rho'])}{edge} | {_pct(val)} | "
                     f"{_pct(row['test_mean'])} ± {_pct(row['test_sd'])} | {seeds} | "
                     f"{'-' if gain is None else f'{gain:.2f}'} | {_pct(row['train_accuracy_mean'])} | "
                     f"{_pct(row['memorized_flipped_mean'])} |")
    return lines


def _timed(timed: dict) -> str:
    if not timed:
        return "-"
    return f"{_ms(timed.get('step_time_mean_s'))}, {_ms(timed['step_time_median_s'])}"


def _time_to(row: dict, level: str) -> tuple[str, str, str]:
    entry = row.get("time_to", {}).get(level)
    if not entry:
        return "-", "-", "-"
    count = f"{entry['seeds_reaching']}/{len(entry['epochs'])}"
    steps = entry["budget_sgd_steps"]
    return (f"{_s(entry['accuracy_runs_s'])} / {_s(entry['timed_s'])}", count,
            "-" if steps is None else f"{steps:.0f}")


def time_table(result: dict) -> list[str]:
    lines = ["| method | step ms (accuracy runs, median) | step ms (timing pass: mean, median) | worker wait ms "
             "| predicted step ms "
             "| epoch s | to SGD's accuracy: s (runs / timing pass), seeds, modelled SGD steps "
             "| to 90% of SAM's gain: s, seeds, modelled SGD steps "
             f"| modelled cost at beta={result['beta']} (x SGD step) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["methods"].items():
        timed = row.get("worker_timing") or {}
        worker = "" if not timed else (" (worker)" if timed.get("worker") else " (main core)")
        cost = row.get("budget_cost")
        sgd_time, sgd_count, sgd_steps = _time_to(row, "sgd")
        g_time, g_count, g_steps = _time_to(row, "gain90")
        lines.append(f"| {_label(name, row, result['batch_size'])} | {_ms(row['step_time_median_s'])} | "
                     f"{_timed(timed)}{worker} | "
                     f"{_ms(timed.get('wait_median_s')) if timed.get('worker') else '-'} | "
                     f"{_ms(row.get('predicted_step_s'))} | {_s(row['epoch_time_median_s'])} | "
                     f"{sgd_time}, {sgd_count}, {sgd_steps} | {g_time}, {g_count}, {g_steps} | "
                     f"{'-' if cost is None else f'{cost:.2f}'} |")
    return lines


def markdown(result: dict) -> str:
    machine = result["machine"]
    timing = result.get("timing") or {}
    base = result.get("profile_baselines", {})
    all_cores = (timing.get("sgd_all_cores") or {}).get("step_time_median_s")
    sam_all = (timing.get("sam_all_cores") or {}).get("step_time_median_s")
    lines = [
        f"## Peers on `{result['task']}`", "",
        f"{result['description']}. {result['epochs']} epochs ({result['steps_per_epoch']} steps each), "
        f"{result['seeds']} seeds per method; each method's rho chosen on the validation split "
        f"(never the test split). SGD {_pct(result['sgd_test_mean'])} %, SAM {_pct(result['sam_test_mean'])} % "
        "(mean test accuracy).", "",
        f"Machine: {machine['cpu']}, {machine['usable_cores']} usable cores, torch {machine['torch']}; "
        f"{result['date']}; commit {result['commit']}; load average {result['load_average']['start']} at the start, "
        f"{result['load_average']['end']} at the end (the machine is shared). Command: `{result['command']}`.", "",
        *accuracy_table(result), "",
        "*(edge)*: the best validation accuracy was at an end of the values tried (the ladder's end, or the walk's "
        "last extension): a better rho may lie beyond. The gain is (method - SGD) / (SAM - SGD) on mean test "
        "accuracy; memorised: the share of training samples with a flipped label that the model predicts with "
        "that wrong label.", "",
        "Times. *Accuracy runs*: this process, one thread; the asynchronous methods computed their ascent "
        "in-process there (the same math, serial), so their step includes it. *Worker process*: a fresh "
        f"model trained {timing.get('steps', '-')} steps with a real worker process (main on core "
        f"{timing.get('main_core', '-')}, worker on core {timing.get('worker_core', '-')}, one thread each); "
        "methods without a worker were timed on the main core in the same pass. "
        f"On all usable cores: SGD {_ms(all_cores)} ms, SAM {_ms(sam_all)} ms. *Predicted*: the cost model on "
        f"`profiles/{base.get('profile', base.get('missing', '-'))}` (main and worker one core each, partial "
        "hiding). *Modelled cost*: a worker that processes beta of the batch per main step, in SGD steps "
        f"(forward+backward share {result['forward_backward_share']:.2f}). `split` is a serial prototype: "
        "no worker timing.", "",
        *time_table(result), "",
    ]
    plots = result.get("plots") or {}
    for title, path in plots.items():
        lines += [f"![{title}]({path})", ""]
    return "\n".join(lines)


__all__ = ["markdown", "accuracy_table", "time_table"]
