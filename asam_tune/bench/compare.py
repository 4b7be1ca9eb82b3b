"""The cost model's plan, the tuned plan and the adapted run, measured side by side.

    asam-tune profile --workload mnist1d-cnn -o runs/profile.json
    asam-tune plan --profile runs/profile.json --batch-size 100 -o runs/plan.json
    asam-tune tune --plan runs/plan.json --trials 12 --output runs/tuned.json
    python -m asam_tune.bench.compare --plan runs/plan.json --tuned runs/tuned.json --output compare.json

One process, one run after another, each on a fresh copy of the model and the same synthetic
batches, with the timing loops of ``asam_tune.steptiming``:

1. on a CPU machine SGD on every usable core (what a user without asam-tune runs); SGD and
   synchronous SAM on the plan's main cores (and on the tuned plan's, if it moved them);
2. asynchronous SAM with the plan's worker and ``b_p``, adaptation off;
3. the same with the tuned plan's;
4. the adapted run: the plan's worker from the plan's ``b_p`` with adaptation on, twice as many
   steps, judged on its second half (after it settled), with its ``b_p`` trajectory;
5. SGD again (pooled with 1: the baseline drifts on a shared machine).

Each asynchronous run reports its median step, IQR, asynchronous SAM / SGD, the hidden
fraction (SAM - ASAM) / (SAM - SGD) with SGD and SAM on the same cores, the main process's
median wait per step, the worker's median time per job, and the plan's prediction beside it;
on a CPU machine also asynchronous SAM / SGD on every core.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch

from asam_tune import arguments as types
from asam_tune.bench.provenance import emit_result, provenance
from asam_tune.errors import UserInputError
from asam_tune.fingerprint import usable_core_ids
from asam_tune.profiler.machine_load import read_load_average
from asam_tune.records import load_record
from asam_tune.records.plan import Plan
from asam_tune.runtime.placement import main_placement, place, preserved_placement
from asam_tune.steptiming import baseline_warning, hidden_fraction_warning, synthetic_batches, time_sam, time_sgd
from asam_tune.timing import summarize
from asam_tune.workloads import load_workload

NOISE_THRESHOLD = 0.1


def _check_comparable(plan: Plan, tuned: Plan) -> None:
    if (plan.workload.name, plan.batch_size) != (tuned.workload.name, tuned.batch_size):
        raise UserInputError(f"the tuned plan is for {tuned.workload.name} at B={tuned.batch_size}, the plan for "
                             f"{plan.workload.name} at B={plan.batch_size}: compare plans of one problem")
    if plan.mode != "staleness1":
        # The adapted run resizes a worker that runs beside the main step: a synchronous plan has none.
        raise UserInputError(f"the plan's mode is {plan.mode!r}: the adapted run needs an asynchronous "
                             "(staleness 1) plan; make one with 'asam-tune plan ... --asynchronous'")


def _run_summary(times: list[float], stats: dict, sgd_s: float, sam_s: float, b_p: int, predicted_s: float) -> dict:
    summary = summarize(times, noise_threshold=NOISE_THRESHOLD)
    step = summary.median_s
    return {"step_time_median_s": step, "step_time_iqr_s": summary.iqr_s, "steps": len(times),
            "noisy": summary.noisy, "b_p": b_p, "asam_over_sgd": step / sgd_s,
            "hidden_fraction": (sam_s - step) / (sam_s - sgd_s) if sam_s > sgd_s else None,
            "predicted_step_s": predicted_s, "prediction_error": predicted_s / step - 1, **stats}


def run_compare(plan: Plan, tuned: Plan, *, workload=None, steps: int = 100, warmup: int = 10,
                rho: float = 0.05, lr: float = 0.01,
                progress: Callable[[str], None] = lambda message: None) -> dict:
    if steps < 10:
        raise UserInputError(f"Invalid steps: {steps!r} (need at least 10 timed steps)")
    _check_comparable(plan, tuned)
    workload = load_workload(workload or plan.workload.name)
    placements = {name: main_placement(p) for name, p in (("plan", plan), ("tuned", tuned))}
    device = placements["plan"][0]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"the plan's main device is {plan.main_device} but CUDA is not available here")
    batches = synthetic_batches(workload, plan.batch_size, warmup + 2 * steps, device)
    fixed, adapted = batches[:warmup + steps], batches
    result: dict = {**provenance(), "workload": workload.name, "batch_size": plan.batch_size, "steps": steps,
                    "warmup": warmup, "rho": rho,
                    "plans": {name: {"main_device": p.main_device, "main_cores": list(placements[name][1]),
                                     "perturbation": p.perturbation.key,
                                     "worker_cores": list(p.perturbation.cores or ()),
                                     "perturbation_batch_size": p.perturbation_batch_size, "mode": p.mode,
                                     "verdict": p.verdict}
                              for name, p in (("plan", plan), ("tuned", tuned))}}
    baselines: dict[tuple[int, ...], dict] = {}
    load_start = read_load_average()
    with preserved_placement():
        if device.type == "cpu":
            # What a user without asam-tune runs: SGD on every usable core (the plans' SGD baseline).
            everything = usable_core_ids()
            place(everything, len(everything))
            progress(f"SGD on all {len(everything)} usable cores")
            result["sgd_all_cores"] = {"step_time_median_s": statistics.median(
                time_sgd(workload, fixed, device, warmup, lr)), "threads": len(everything)}
        for _, cores, threads in placements.values():
            if cores in baselines:
                continue
            place(cores, threads)
            progress(f"SGD and synchronous SAM on cores {list(cores)}")
            sgd = time_sgd(workload, fixed, device, warmup, lr)
            sam, _ = time_sam(workload, fixed, device, warmup, lr, rho, staleness=0,
                              ascent_dtype=plan.ascent_dtype or "parameters")  # as the plans run it
            baselines[cores] = {"sgd": sgd, "sam": sam, "threads": threads}

        def asam(name: str, p: Plan, run_batches: list, adapt: bool) -> tuple[list[float], dict]:
            _, cores, threads = placements[name]
            place(cores, threads)
            progress(f"asynchronous SAM, {name}: {p.perturbation.key}, b_p={p.perturbation_batch_size}"
                     + (", adapting" if adapt else ""))
            return time_sam(workload, run_batches, device, warmup, lr, rho, plan=p, allow_other_machine=True,
                            adapt=adapt)

        runs = {"plan": asam("plan", plan, fixed, False), "tuned": asam("tuned", tuned, fixed, False),
                "adapted": asam("plan", plan, adapted, True)}
        for cores, base in baselines.items():
            place(cores, base["threads"])
            progress(f"SGD again on cores {list(cores)}")
            base["sgd"] = base["sgd"] + time_sgd(workload, fixed, device, warmup, lr)

    result["baselines"] = {",".join(map(str, cores)): {"sgd_step_median_s": statistics.median(b["sgd"]),
                                                       "sam_step_median_s": statistics.median(b["sam"])}
                           for cores, b in baselines.items()}
    for name, (times, stats) in runs.items():
        source = tuned if name == "tuned" else plan
        cores = placements["tuned" if name == "tuned" else "plan"][1]
        sgd_s = statistics.median(baselines[cores]["sgd"])
        sam_s = statistics.median(baselines[cores]["sam"])
        if name == "adapted":
            settled = times[len(times) // 2:]
            trajectory = stats["b_p_trajectory"]
            final_bp = trajectory[-1][1] if trajectory else source.perturbation_batch_size
            result[name] = {**_run_summary(settled, stats, sgd_s, sam_s, final_bp,
                                           source.predictions.asam_step_s),
                            "initial_b_p": source.perturbation_batch_size, "judged_steps": "second half"}
        else:
            result[name] = _run_summary(times, stats, sgd_s, sam_s, source.perturbation_batch_size,
                                        source.predictions.asam_step_s)
        if "sgd_all_cores" in result:
            result[name]["asam_over_sgd_all_cores"] = (result[name]["step_time_median_s"]
                                                      / result["sgd_all_cores"]["step_time_median_s"])
    result["load_average"] = {"start": load_start, "end": read_load_average()}
    # The plans' SGD baseline runs on every free core of a CPU machine (the accelerator otherwise).
    sgd_base = (result["sgd_all_cores"]["step_time_median_s"] if "sgd_all_cores" in result
                else statistics.median(baselines[placements["plan"][1]]["sgd"]))
    hidden = {name: hidden_fraction_warning(result[name]["hidden_fraction"]) for name in runs}
    result["warnings"] = [w for w in (
        baseline_warning(sgd_base, plan.predictions.sgd_step_s, "SGD", load=result["load_average"]["end"]),
        *(f"{name} run: {w}" for name, w in hidden.items() if w)) if w]
    return result


def markdown(result: dict) -> str:
    machine = result["machine"]
    rows = []
    labels = {"plan": "cost model's plan", "tuned": "tuned plan (`asam-tune tune`)",
              "adapted": "plan + online adaptation (second half)"}
    for name, label in labels.items():
        r = result[name]
        hidden = r["hidden_fraction"]
        b_p = (f"{r['initial_b_p']} -> {r['b_p']}" if name == "adapted" else str(r["b_p"]))
        all_cores = r.get("asam_over_sgd_all_cores")
        rows.append(f"| {label} | {b_p} | {1e3 * r['step_time_median_s']:.2f} | {1e3 * r['step_time_iqr_s']:.2f} | "
                    f"{r['asam_over_sgd']:.3f} | {'-' if all_cores is None else f'{all_cores:.3f}'} | "
                    f"{'-' if hidden is None else f'{hidden:.2f}'} | "
                    f"{1e3 * r['wait_median_s']:.2f} | {1e3 * r['worker_compute_median_s']:.2f} | "
                    f"{1e3 * r['predicted_step_s']:.2f} |")
    everything = result.get("sgd_all_cores")
    base = "" if everything is None else (f"SGD on all {everything['threads']} cores "
                                          f"{1e3 * everything['step_time_median_s']:.2f} ms; ")
    base += "; ".join(f"cores {cores}: SGD {1e3 * b['sgd_step_median_s']:.2f} ms, SAM {1e3 * b['sam_step_median_s']:.2f} ms"
                     for cores, b in result["baselines"].items())
    return "\n".join([
        f"`{result['workload']}`, B={result['batch_size']}, {result['steps']} timed steps per fixed run "
        f"(the adapted run {2 * result['steps']}, judged on its second half). Machine: {machine['cpu']}, "
        f"{machine['usable_cores']} usable cores; torch {machine['torch']}; {result['date']}; commit "
        f"{result['commit']}. Baselines: {base}.", "",
        "| run | b_p | median ms | IQR ms | ASAM / SGD (main cores) | ASAM / SGD (all cores) | hidden fraction "
        "| wait ms | worker ms | predicted ms |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows,
    ]) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, metavar="PLAN", help="the cost model's plan (asam-tune plan)")
    parser.add_argument("--tuned", required=True, metavar="PLAN", help="the tuned plan (asam-tune tune --output)")
    parser.add_argument("--workload", default=None, metavar="NAME", help="default: the plan's built-in workload")
    parser.add_argument("--steps", type=types.positive_int, default=100, metavar="N",
                        help="timed steps per fixed run; the adapted run takes twice as many (default 100, at least 10)")
    parser.add_argument("--warmup", type=types.non_negative_int, default=10, metavar="N",
                        help="untimed steps before each run (default 10)")
    parser.add_argument("--rho", type=types.non_negative_float, default=0.05, help="SAM's radius (default 0.05)")
    parser.add_argument("--output", default=None, metavar="JSON", help="write the full result as JSON here")


def run(args: argparse.Namespace) -> int:
    plan, tuned = load_record(Plan, args.plan), load_record(Plan, args.tuned)
    result = run_compare(plan, tuned, workload=args.workload, steps=args.steps, warmup=args.warmup,
                         rho=args.rho, progress=lambda line: print(line, file=sys.stderr, flush=True))
    for message in result["warnings"]:
        print(f"asam-tune: warning: {message}", file=sys.stderr)
    return emit_result(result, args.output, markdown(result))


def main(argv=None) -> int:
    return types.script_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
