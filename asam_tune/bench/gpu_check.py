"""The prepared GPU check: profile, plan, speed, memory, a short accuracy run and an NVTX trace.

One command, at most ``--budget-s`` (default 480 s) on an H100-class machine:

    python -m asam_tune.bench.gpu_check --out OUTDIR

For each case (resnet20 at B=128 and 256, vit-tiny at B=128) it profiles the GPU and the CPU,
plans with the CPU as the perturbation device, and measures SGD, synchronous SAM and
asynchronous SAM with the CPU worker in one run, next to the plan's predictions; then the
same-GPU stream worker (b_p = B/2) with the ascent in the parameters' dtype and in bf16, with
each method's peak GPU memory. Then a short MNIST-1D run with the GPU as the main device (SGD,
SAM, asynchronous SAM with the CPU worker and with the stream; one seed: a smoke check, not an
accuracy claim), and a trace of the stream worker with NVTX ranges under ``nsys`` when it is
installed. It writes the profiles (``profile-<workload>.json``, to commit into ``profiles/``),
the plans, every result (``gpu-check.json``) and the tables (``gpu-check.md``). A phase that
would run past the budget is skipped and listed as such.

``--dry-run`` runs the same code on the CPU (the main device a CPU core, the stream worker's
own code through the recording fake CUDA layer, MNIST-1D-CNN at B=32 as the only case, a few
steps): what a machine without a GPU can check of the script.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from asam_tune.arguments import positive_int, script_main

CASES = (("resnet20", (128, 256)), ("vit-tiny", (128,)))
DRY_RUN_CASES = (("mnist1d-cnn", (32,)),)
TRACE_WORKLOAD = "resnet20", 128
DRY_RUN_TRACE_WORKLOAD = "mnist1d-cnn", 32
STREAM_SHARE = 0.5  # the stream worker's b_p / B
ACCURACY_METHODS = ("sgd", "sam", "asam-cpu-worker", "asam-stream")


def _log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Budget:
    """The check's time limit: a phase starts only when its estimate still fits."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, phase: str, estimate_s: float) -> bool:
        if self.left() >= estimate_s:
            return True
        self.skipped.append(f"{phase} (needs about {estimate_s:.0f} s, {max(0.0, self.left()):.0f} s left)")
        _log(f"skipping {phase}: out of time")
        return False


def stream_options(device) -> dict:
    """``AsyncSAM`` options for the stream worker on ``device``; on a CPU its code through the fake layer."""
    if device.type == "cuda":
        return {"perturbation_device": "cuda"}
    from asam_tune.perturbers.device_layer import RecordingLayer
    from asam_tune.perturbers.stream import StreamPerturber

    return {"perturber": lambda task: StreamPerturber(task, device=device, secondary_stream=True,
                                                      layer=RecordingLayer(device_types=(device.type,)))}


def _peak_memory(device, run):
    """``run()``'s result and the device's peak allocated bytes during it (None on a CPU)."""
    import torch

    if device.type != "cuda":
        return run(), None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    value = run()
    torch.cuda.synchronize(device)
    return value, int(torch.cuda.max_memory_allocated(device))


def measure_stream_variants(workload_name: str, batch_size: int, device, steps: int, warmup: int) -> dict:
    """SGD, the stream worker in the parameters' dtype and in bf16: step times and peak memory."""
    import torch

    from asam_tune.bench.speed import _summary
    from asam_tune.steptiming import synthetic_batches, time_sam, time_sgd
    from asam_tune.workloads import load_workload

    workload = load_workload(workload_name)
    batches = synthetic_batches(workload, batch_size, warmup + steps, device)
    b_p = max(1, int(batch_size * STREAM_SHARE))
    out: dict = {"workload": workload_name, "batch_size": batch_size, "perturbation_batch_size": b_p,
                 "device": str(device)}
    times, peak = _peak_memory(device, lambda: time_sgd(workload, batches, device, warmup, 0.01))
    out["sgd"] = {**_summary(times), "peak_memory_bytes": peak}
    for name, dtype in (("stream", None), ("stream-bf16", torch.bfloat16)):
        _log(f"  {workload_name} B={batch_size}: {name}")
        options = {**stream_options(device), "perturbation_batch_size": b_p, "staleness": 1, "adapt": False,
                   "ascent_dtype": dtype}
        (times, stats), peak = _peak_memory(
            device, lambda: time_sam(workload, batches, device, warmup, 0.01, 0.05, **options))
        out[name] = {**_summary(times), **stats, "peak_memory_bytes": peak}
        out[name]["over_sgd"] = out[name]["step_time_median_s"] / out["sgd"]["step_time_median_s"]
    return out


def accuracy_run(device, epochs: int, methods=ACCURACY_METHODS) -> list[dict]:
    """A short MNIST-1D run per method with ``device`` as the main device (one seed: a smoke check)."""
    from asam_tune.bench.training import TrainConfig, train_mnist1d

    rows = []
    for method in methods:
        options = {}
        if method == "asam-cpu-worker":
            options = {"perturbation_device": "cpu"}
        elif method == "asam-stream":
            options = stream_options(device)
        config = TrainConfig(method="asam" if method.startswith("asam") else method, epochs=epochs)
        _log(f"  MNIST-1D {method} on {device}")
        result = train_mnist1d(config, device=device, sam_options=options)
        result.pop("worker", None)
        rows.append({**result, "method": method, "device": str(device)})
    return rows


def traced_steps(device, steps: int) -> dict:
    """The stream worker with NVTX ranges on, ``steps`` steps (what ``nsys`` records)."""
    from asam_tune.steptiming import synthetic_batches, time_sam
    from asam_tune.workloads import load_workload

    name, batch_size = TRACE_WORKLOAD if device.type == "cuda" else DRY_RUN_TRACE_WORKLOAD
    workload = load_workload(name)
    batches = synthetic_batches(workload, batch_size, steps, device)
    times, stats = time_sam(workload, batches, device, 0, 0.01, 0.05, **stream_options(device),
                            perturbation_batch_size=batch_size // 2, staleness=1, adapt=False, nvtx=True)
    return {"workload": name, "batch_size": batch_size, "steps": len(times), "fallbacks": stats["fallbacks"]}


def record_trace(out: Path, device, budget: Budget) -> dict:
    """An ``nsys`` trace of ``traced_steps`` when nsys exists; else the steps alone, in-process."""
    nsys = shutil.which("nsys")
    if nsys is None or device.type != "cuda":
        why = "nsys not found" if nsys is None else "no GPU"
        return {"nsys": None, "note": f"{why}: NVTX ranges exercised without a trace file",
                **traced_steps(device, 5)}
    if not budget.allows("the nsys trace", 60):
        return {"nsys": nsys, "note": "skipped: out of time"}
    report = out / "trace-stream-nvtx"
    command = [nsys, "profile", "--trace=cuda,nvtx", "--force-overwrite=true", "-o", str(report),
               sys.executable, "-m", "asam_tune.bench.gpu_check", "--trace-steps", "30", "--device", str(device),
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=max(30.0, min(180.0, budget.left())))
    result = {"nsys": nsys, "command": " ".join(command), "returncode": done.returncode,
              "stderr_tail": done.stderr[-2000:]}
    trace = report.with_suffix(".nsys-rep")
    if trace.exists():
        result["trace"] = trace.name
        stats = subprocess.run([nsys, "stats", "--report", "nvtx_sum", "--format", "csv", str(trace)],
                               capture_output=True, text=True, timeout=120)
        (out / "trace-nvtx-summary.csv").write_text(stats.stdout)
        result["nvtx_summary"] = "trace-nvtx-summary.csv"
    return result


# ------------------------------------------------------------------------------------- tables


def _ms(value) -> str:
    return "-" if value is None else f"{1e3 * value:.2f}"


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _row(result: dict) -> str:
    def ms(key):
        return _ms(result[key]["step_time_median_s"])

    hidden = result["hidden_fraction"]
    placement = result["placement"]
    return (f"| {result['workload']} | {result['batch_size']} | {placement['perturbation']} | "
            f"{placement['perturbation_batch_size']} | {ms('sgd')} | {ms('sam')} | {ms('asam')} | "
            f"{_ms(result['predicted']['asam_step_s'])} | {result['asam_over_sgd']:.3f} | "
            f"{result['sam_over_sgd']:.2f} | {'-' if hidden is None else f'{hidden:.2f}'} | "
            f"{_ms(result['asam']['worker_compute_median_s'])} | {_ms(result['asam']['wait_median_s'])} |")


def _stream_row(v: dict, name: str) -> str:
    r = v[name]
    return (f"| {v['workload']} | {v['batch_size']} | {name} | {v['perturbation_batch_size']} | "
            f"{_ms(v['sgd']['step_time_median_s'])} | {_ms(r['step_time_median_s'])} | {r['over_sgd']:.3f} | "
            f"{_ms(r['worker_compute_median_s'])} | {_ms(r['wait_median_s'])} | {_mb(v['sgd']['peak_memory_bytes'])} | "
            f"{_mb(r['peak_memory_bytes'])} | {r['fallbacks']} |")


def markdown(document: dict) -> str:
    machine, head = document["machine"], document
    lines = [f"Machine: {', '.join(machine['gpus']) or 'no GPU'}; CPU {machine['cpu']} "
             f"({machine['usable_cores']} usable cores); torch {machine['torch']} (CUDA {machine['cuda']}); "
             f"date {head['date']}; commit {head['commit']}; load average {document['load_average']}. "
             f"Command: `{document['command']}`" + (" (a dry run on the CPU)" if document["dry_run"] else "") + ".",
             "", "CPU worker, planned:", "",
             "| workload | B | perturbation | b_p | SGD ms | SAM ms | async SAM ms | predicted async ms | "
             "async/SGD | SAM/SGD | hidden | worker ms/job | main wait ms/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in document["speed"]]
    lines += ["", "Same-GPU stream worker, b_p = B/2, ascent in the parameters' dtype and in bf16:", "",
              "| workload | B | worker | b_p | SGD ms | async SAM ms | async/SGD | worker ms/job | "
              "main wait ms/step | SGD peak MB | peak MB | fallbacks |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_stream_row(v, name) for v in document["stream"] for name in ("stream", "stream-bf16")]
    lines += ["", f"MNIST-1D, one seed, {document['device']} as the main device (a smoke check, not an accuracy "
              "claim):", "",
              "| method | epochs | test accuracy | train accuracy | median step ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['epochs']} | {r['test_accuracy']:.3f} | {r['train_accuracy']:.3f} | "
              f"{_ms(r['step_time_median_s'])} |" for r in document["accuracy"]]
    trace = document.get("trace") or {}
    lines += ["", f"Trace: {trace.get('trace') or trace.get('note') or 'none'}."]
    lines += ["", "Plans' verdicts:"] + [f"- {name}: {verdict}" for name, verdict in document["verdicts"].items()]
    if document["skipped"]:
        lines += ["", "Skipped (out of time): " + "; ".join(document["skipped"])]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- the run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for profiles, results and the tables")
    parser.add_argument("--steps", type=positive_int, default=40, metavar="N",
                        help="timed steps per method in each speed benchmark (default 40)")
    parser.add_argument("--budget-s", type=positive_int, default=480, metavar="S",
                        help="stop starting new phases after this many seconds (default 480)")
    parser.add_argument("--device", default=None, metavar="DEV", help="the main device (default cuda:0)")
    parser.add_argument("--dry-run", "--cpu-only", dest="dry_run", action="store_true",
                        help="the same code on the CPU: one small case, a few steps, quick profiles")
    parser.add_argument("--quick", action="store_true", help="quick profiles")
    parser.add_argument("--ascent-dtype", default=None, metavar="DTYPE",
                        help="profile the first case's ascent under autocast too (bf16 or fp16): its plans and "
                             "speed runs then use that dtype; the other cases stay in the parameters' dtype")
    parser.add_argument("--trace-steps", type=positive_int, default=None, help=argparse.SUPPRESS)


def main(argv=None) -> int:
    return script_main(__doc__, add_arguments, run, argv)


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from asam_tune import api
    from asam_tune.bench.provenance import provenance
    from asam_tune.bench.speed import run_speed_bench
    from asam_tune.profiler import run_profile
    from asam_tune.records import dump_record, write_atomic

    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda:0"))
    if args.trace_steps is not None:  # the run nsys records
        torch.set_num_threads(1)
        print(json.dumps(traced_steps(device, args.trace_steps)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda" and not torch.cuda.is_available():
        _log("no CUDA device visible: rerun with --dry-run for a dry run on the CPU")
        return 2
    from asam_tune.records.profile import ascent_dtype_name

    ascent_dtype = ascent_dtype_name(args.ascent_dtype)  # a typo is one line now, not after the first case
    budget = Budget(args.budget_s)
    steps = min(args.steps, 4) if args.dry_run else args.steps
    warmup = 1 if args.dry_run else 5
    cases = DRY_RUN_CASES if args.dry_run else CASES
    gpu = device.type == "cuda"
    devices = ("cpu", str(device)) if gpu else ("cpu",)
    # The profiler names devices ("cpu", "cuda:0"); the plan names configurations ("cpu/1t").
    profile_main, main_device = (str(device), str(device)) if gpu else ("cpu", "cpu/1t")
    document: dict = {**provenance(), "dry_run": bool(args.dry_run), "device": str(device),
                      "command": "python -m asam_tune.bench.gpu_check" + (" --dry-run" if args.dry_run else ""),
                      "speed": [], "stream": [], "accuracy": [], "trace": None, "verdicts": {}, "skipped": []}
    for index, (workload, batch_sizes) in enumerate(cases):
        if not budget.allows(f"profile of {workload}", 45):
            continue
        # Only the first case doubles its sweeps for the ascent's dtype: the budget is for all cases.
        case_dtype = ascent_dtype if index == 0 else None
        _log(f"profiling {workload} on {', '.join(devices)}" + (f", the ascent also in {case_dtype}" if case_dtype else ""))
        sweep = sorted({8, 16, 32, *batch_sizes}) if args.dry_run else sorted({8, 16, 32, 64, *batch_sizes})
        profile = run_profile(workload, devices=devices, batch_sizes=sweep, quick=args.quick or args.dry_run,
                              main_device=profile_main, progress=lambda update: _log(f"  {update.message}"),
                              ascent_dtype=case_dtype)
        dump_record(profile, out / f"profile-{workload}.json")
        for batch_size in batch_sizes:
            name = f"{workload}-b{batch_size}"
            if budget.allows(f"speed of {name}", 40):
                plan = api.plan_for(profile, batch_size, main_device=main_device, asynchronous=True)
                dump_record(plan, out / f"plan-{name}.json")
                document["verdicts"][name] = plan.verdict
                _log(f"{name}: {plan.verdict}")
                result = run_speed_bench(workload, plan, steps=steps, warmup=warmup,
                                         progress=lambda message: _log(f"  measuring {message}"))
                document["speed"].append(result)
            if budget.allows(f"stream worker on {name}", 30):
                document["stream"].append(measure_stream_variants(workload, batch_size, device, steps, warmup))
    if budget.allows("the MNIST-1D run", 60):
        document["accuracy"] = accuracy_run(device, epochs=1 if args.dry_run else 3)
    document["trace"] = record_trace(out, device, budget)
    document["skipped"] = budget.skipped
    document["load_average"] = [round(x, 2) for x in os.getloadavg()]
    write_atomic(out / "gpu-check.json", json.dumps(document, indent=2, allow_nan=False, default=str) + "\n")
    table = markdown(document)
    write_atomic(out / "gpu-check.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
