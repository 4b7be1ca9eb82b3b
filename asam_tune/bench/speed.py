"""Step times of SGD, synchronous SAM and asynchronous SAM, measured in one run.

All three run in this process on the same main device with the same placement (the plan's
main cores and threads), one after the other, each on a fresh copy of the model and the same
synthetic batches; asynchronous SAM adds the plan's worker. On a CPU machine SGD is also
measured on every usable core ("sgd_all_cores"), which is what a user without asam-tune
would run. The result is a plain dict (JSON) stamped with machine, date and commit.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from asam_tune.bench.provenance import provenance
from asam_tune.errors import UserInputError
from asam_tune.fingerprint import usable_core_ids
from asam_tune.profiler.busy import asam_tune_jobs
from asam_tune.profiler.machine_load import read_load_average
from asam_tune.records.plan import Plan
from asam_tune.runtime.placement import main_placement, place, preserved_placement
from asam_tune.steptiming import baseline_warning, hidden_fraction_warning, synthetic_batches, time_sam, time_sgd
from asam_tune.timing import summarize
from asam_tune.workloads import Workload, load_workload

NOISE_THRESHOLD = 0.1  # IQR / median above which a run is flagged noisy (as the profiler does)


def _summary(samples: list[float]) -> dict:
    stats = summarize(samples, noise_threshold=NOISE_THRESHOLD)
    return {"step_time_median_s": stats.median_s, "step_time_iqr_s": stats.iqr_s, "steps": len(samples),
            "noisy": stats.noisy}


def _measure_all(result: dict, workload: Workload, plan: Plan, batches: list, device: torch.device,
                 main_cores: tuple[int, ...], main_threads: int, warmup: int, lr: float, rho: float,
                 progress: Callable[[str], None]) -> None:
    # SAM's ascent in the dtype asynchronous SAM runs it in (the plan's): like for like.
    sam_dtype = plan.ascent_dtype or "parameters"
    result["ascent_dtype"] = plan.ascent_dtype
    if device.type == "cpu":
        everything = usable_core_ids()
        place(everything, len(everything))
        progress(f"SGD on all {len(everything)} usable cores")
        result["sgd_all_cores"] = {**_summary(time_sgd(workload, batches, device, warmup, lr)),
                                   "threads": len(everything)}
        progress(f"synchronous SAM on all {len(everything)} usable cores")
        sam_times, _ = time_sam(workload, batches, device, warmup, lr, rho, staleness=0, ascent_dtype=sam_dtype)
        result["sam_all_cores"] = {**_summary(sam_times), "threads": len(everything)}
    place(main_cores, main_threads)
    progress("SGD")
    result["sgd"] = _summary(time_sgd(workload, batches, device, warmup, lr))
    progress("synchronous SAM")
    sam_times, _ = time_sam(workload, batches, device, warmup, lr, rho, staleness=0, ascent_dtype=sam_dtype)
    result["sam"] = _summary(sam_times)
    progress(f"asynchronous SAM ({plan.perturbation.key}, b_p={plan.perturbation_batch_size})")
    # adapt=False: measure the plan's b_p as planned (bench/adapt.py measures the adaptation).
    asam_times, asam_stats = time_sam(workload, batches, device, warmup, lr, rho, plan=plan,
                                      allow_other_machine=True, adapt=False, record_timeline=True)
    result["asam"] = {**_summary(asam_times), **asam_stats}


def run_speed_bench(workload: Workload | str, plan: Plan, *, steps: int = 30, warmup: int = 5,
                    rho: float = 0.05, lr: float = 0.01,
                    progress: Callable[[str], None] = lambda message: None) -> dict:
    if steps < 3:
        raise UserInputError(f"Invalid steps: {steps!r} (need at least 3 timed steps)")
    if isinstance(workload, str):
        workload = load_workload(workload)
    batch_size = plan.batch_size
    device, main_cores, main_threads = main_placement(plan)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"the plan's main device is {plan.main_device} but CUDA is not available here")
    batches = synthetic_batches(workload, batch_size, warmup + steps, device)
    result: dict = {**provenance(), "workload": workload.name, "batch_size": batch_size, "steps": steps,
                    "warmup": warmup, "rho": rho,
                    "placement": {"main_device": str(device), "main_cores": list(main_cores),
                                  "main_threads": main_threads, "perturbation": plan.perturbation.key,
                                  "worker_cores": list(plan.perturbation.cores or ()),
                                  "perturbation_batch_size": plan.perturbation_batch_size, "mode": plan.mode}}
    load_start, jobs = read_load_average(), list(asam_tune_jobs())
    with preserved_placement():  # leave the caller's process as it was (gpu_check runs this in-process)
        _measure_all(result, workload, plan, batches, device, main_cores, main_threads, warmup, lr, rho, progress)
    result["load_average"] = {"start": load_start, "end": read_load_average()}
    jobs += [job for job in asam_tune_jobs() if job not in jobs]

    t_sgd, t_sam, t_asam = (result[k]["step_time_median_s"] for k in ("sgd", "sam", "asam"))
    result["asam_over_sgd"] = t_asam / t_sgd
    result["sam_over_sgd"] = t_sam / t_sgd
    result["hidden_fraction"] = (t_sam - t_asam) / (t_sam - t_sgd) if t_sam > t_sgd else None
    if "sgd_all_cores" in result:
        result["asam_over_sgd_all_cores"] = t_asam / result["sgd_all_cores"]["step_time_median_s"]
    # The plan's SGD and SAM baselines run on every free core of a CPU machine (the main
    # accelerator otherwise): compare each prediction with the run that matches it.
    predicted = plan.predictions
    sgd_base = result.get("sgd_all_cores", result["sgd"])["step_time_median_s"]
    sam_base = result.get("sam_all_cores", result["sam"])["step_time_median_s"]
    result["verdict"] = plan.verdict
    result["predicted"] = {"sgd_step_s": predicted.sgd_step_s, "sam_step_s": predicted.sam_step_s,
                           "asam_step_s": predicted.asam_step_s}
    result["prediction_error"] = {"asam": predicted.asam_step_s / t_asam - 1,
                                  "sgd": predicted.sgd_step_s / sgd_base - 1,
                                  "sam": predicted.sam_step_s / sam_base - 1}
    # Numbers that cannot be right say so where they are made, not in a reader's head.
    result["warnings"] = [w for w in (
        f"another asam-tune job ran beside the benchmark ({'; '.join(map(str, jobs))}): its times are inflated"
        if jobs else None,
        baseline_warning(sgd_base, predicted.sgd_step_s, "SGD", load=result["load_average"]["end"]),
        hidden_fraction_warning(result["hidden_fraction"])) if w]
    return result


def _load_text(load: dict | None) -> str:
    def first(loads):
        return "unknown" if not loads else f"{loads[0]:.2f}"

    return "not recorded" if load is None else f"{first(load['start'])} -> {first(load['end'])}"


def markdown(result: dict) -> str:
    """The result as a markdown table with its provenance, for docs/."""
    machine, placement = result["machine"], result["placement"]
    sgd = result["sgd"]["step_time_median_s"]
    predicted = result["predicted"]

    def row(label: str, key: str, predicted_s: float | None = None) -> str:
        r = result[key]
        guess = f"{1e3 * predicted_s:.2f}" if predicted_s is not None else ""
        return (f"| {label} | {1e3 * r['step_time_median_s']:.2f} | {1e3 * r['step_time_iqr_s']:.2f} | "
                f"{r['step_time_median_s'] / sgd:.2f} | {guess} |")

    rows = []
    on_cpu = "sgd_all_cores" in result
    if on_cpu:
        rows.append(row(f"SGD, all {result['sgd_all_cores']['threads']} cores", "sgd_all_cores",
                        predicted["sgd_step_s"]))
        rows.append(row(f"synchronous SAM, all {result['sam_all_cores']['threads']} cores", "sam_all_cores",
                        predicted["sam_step_s"]))
    rows += [row(f"SGD, main cores {placement['main_cores']}", "sgd", None if on_cpu else predicted["sgd_step_s"]),
             row("synchronous SAM, main cores", "sam", None if on_cpu else predicted["sam_step_s"]),
             row(f"asynchronous SAM, worker {placement['perturbation']} on cores {placement['worker_cores']}, "
                 f"b_p={placement['perturbation_batch_size']}", "asam", predicted["asam_step_s"])]
    hidden = result["hidden_fraction"]
    return "\n".join([
        f"`{result['workload']}`, B={result['batch_size']}, {result['steps']} timed steps after {result['warmup']} "
        f"warm-up. Machine: {machine['cpu']}, {machine['usable_cores']} usable cores, GPUs: "
        f"{', '.join(machine['gpus']) or 'none'}; torch {machine['torch']}; {result['date']}; "
        f"commit {result['commit']}.", "",
        "| run | median ms | IQR ms | x SGD (main cores) | predicted ms |", "|---|---|---|---|---|", *rows, "",
        f"asynchronous SAM / SGD = {result['asam_over_sgd']:.3f}; SAM / SGD = {result['sam_over_sgd']:.2f}; "
        f"hidden fraction = {'-' if hidden is None else f'{hidden:.2f}'}; worker {1e3 * result['asam']['worker_compute_median_s']:.2f}"
        f" ms per job; the main process waited {1e3 * result['asam']['wait_median_s']:.2f} ms per step (median); "
        "predicted / measured - 1: " + ", ".join(f"{k} {v:+.1%}" for k, v in result["prediction_error"].items())
        + ". "
        f"Plan's verdict: {result['verdict']}",
        *(["", *(f"Warning: {w}" for w in result.get("warnings", ()))] if result.get("warnings") else []),
    ]) + "\n"
