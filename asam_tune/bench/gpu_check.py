"""The prepared GPU check: profile, plan and speed benchmark on a machine with an NVIDIA GPU.

One command, well under 8 minutes on an H100-class machine:

    python -m asam_tune.bench.gpu_check --out OUTDIR

For each case (resnet20 at B=128 and 256, vit-tiny at B=128) it profiles the GPU and the CPU
at several thread counts, plans with the CPU as the perturbation device, and measures SGD,
synchronous SAM and asynchronous SAM in one run, next to the plan's predictions. It writes
the profiles (``profile-<workload>.json``, to commit into ``profiles/``), every result
(``gpu-check.json``) and a markdown table (``gpu-check.md``, to commit into ``docs/``).
``--cpu-only`` runs the same pipeline on a machine without a GPU (a dry run of the script).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from asam_tune.arguments import positive_int, script_main

CASES = (("resnet20", (128, 256)), ("vit-tiny", (128,)))


def _log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _row(result: dict) -> str:
    def ms(key):
        return f"{1e3 * result[key]['step_time_median_s']:.2f}"

    predicted = 1e3 * result["predicted"]["asam_step_s"]
    hidden = result["hidden_fraction"]
    placement = result["placement"]
    return (f"| {result['workload']} | {result['batch_size']} | {placement['perturbation']} | "
            f"{placement['perturbation_batch_size']} | {ms('sgd')} | {ms('sam')} | {ms('asam')} | "
            f"{predicted:.2f} | {result['asam_over_sgd']:.3f} | {result['sam_over_sgd']:.2f} | "
            f"{'-' if hidden is None else f'{hidden:.2f}'} | "
            f"{1e3 * result['asam']['worker_compute_median_s']:.2f} | {1e3 * result['asam']['wait_median_s']:.2f} |")


def markdown(results: list[dict], plans: dict) -> str:
    head = results[0]
    machine = head["machine"]
    lines = [f"Machine: {', '.join(machine['gpus']) or 'no GPU'}; CPU {machine['cpu']} "
             f"({machine['usable_cores']} usable cores); torch {machine['torch']} (CUDA {machine['cuda']}); "
             f"date {head['date']}; commit {head['commit']}. Command: `python -m asam_tune.bench.gpu_check`.",
             "",
             "| workload | B | perturbation | b_p | SGD ms | SAM ms | async SAM ms | predicted async ms | "
             "async/SGD | SAM/SGD | hidden | worker ms/job | main wait ms/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in results]
    lines += ["", "Plans' verdicts:"]
    lines += [f"- {name}: {plan.verdict}" for name, plan in plans.items()]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for profiles, results and the table")
    parser.add_argument("--steps", type=positive_int, default=60, metavar="N",
                        help="timed steps per method in each speed benchmark (default 60)")
    parser.add_argument("--cpu-only", action="store_true", help="dry run without a GPU (main device: 1 CPU core)")
    parser.add_argument("--quick", action="store_true", help="quick profiles (for dry runs)")


def main(argv=None) -> int:
    return script_main(__doc__, add_arguments, run, argv)


def run(args: argparse.Namespace) -> int:
    import torch

    from asam_tune import api
    from asam_tune.bench.speed import run_speed_bench
    from asam_tune.profiler import run_profile
    from asam_tune.records import dump_record, write_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.cpu_only and not torch.cuda.is_available():
        _log("no CUDA device visible: rerun with --cpu-only for a dry run")
        return 2
    devices = ("cpu",) if args.cpu_only else ("cpu", "cuda:0")
    # The profiler names devices ("cpu", "cuda:0"); the plan names configurations ("cpu/1t").
    profile_main, main_device = ("cpu", "cpu/1t") if args.cpu_only else ("cuda:0", "cuda:0")
    results, plans = [], {}
    for workload, batch_sizes in CASES:
        _log(f"profiling {workload} on {', '.join(devices)}")
        sweep = sorted({8, 16, 32, 64, *batch_sizes})
        profile = run_profile(workload, devices=devices, batch_sizes=sweep, quick=args.quick,
                              main_device=profile_main,
                              progress=lambda update: _log(f"  {update.message}"))
        dump_record(profile, out / f"profile-{workload}.json")
        for batch_size in batch_sizes:
            plan = api.plan_for(profile, batch_size, main_device=main_device, asynchronous=True)
            name = f"{workload}-b{batch_size}"
            plans[name] = plan
            dump_record(plan, out / f"plan-{name}.json")
            _log(f"{name}: {plan.verdict}")
            result = run_speed_bench(workload, plan, steps=args.steps,
                                     progress=lambda message: _log(f"  measuring {message}"))
            results.append(result)
            _log(f"  {_row(result)}")
    write_atomic(out / "gpu-check.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    table = markdown(results, plans)
    write_atomic(out / "gpu-check.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
