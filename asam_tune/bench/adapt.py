"""Online b_p adaptation benchmark: does asynchronous SAM get back to SGD's step time?

On a CPU machine, the main process on one core (one thread) and the CPU worker on another::

    python -m asam_tune.bench.adapt --workload resnet20 --batch-size 128 --steps 250 --sgd-steps 30 --output out.json

measures, in one run: SGD's median step time on the main core; the ascent's time at a few
``b_p`` on the same core, from which the ``b_p`` that hides on an idle machine (its time fits
in one SGD step: what a plan made on that machine says) is estimated; then two
asynchronous-SAM runs with adaptation on (default settings), each beside a competing load
pinned to the worker's core (``--load torch``: a one-thread matrix-multiply loop, like another
job's compute; ``--load python``: a pure-Python spin):

- ``wrong_plan``: the load runs from the start, so the idle machine's ``b_p`` (or
  ``--initial-bp``) is about twice what the worker's half of its core can hide;
- ``competing_load``: starts from the ``b_p`` that hides; at ``--load-at`` the load starts
  and runs to the end.

``--staleness non_blocking`` runs both with a worker the main step never waits for (it
applies the newest perturbation there is).

For each: per-step times and ``b_p``, the rolling median (window 20) of step time / SGD's
median, the first step at which it is back to <= 1.10 (the issue's target: within 200 steps),
the b_p trajectory and the final ratio. SGD is timed before, between and after the runs, the
last time with the load running (the ratios use SGD measured under the same conditions as the
steps they judge; the idle machine's ratios are kept beside them). Stamped with machine,
date, commit and the load average.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from asam_tune import arguments as types
from asam_tune.bench.provenance import emit_result, provenance
from asam_tune.errors import UserInputError
from asam_tune.fingerprint import usable_core_ids
from asam_tune.runtime import AsyncSAM
from asam_tune.affinity import can_pin
from asam_tune.perturbers.ascent import ascent_perturbation
from asam_tune.perturbers.batches import OutputTargetLoss
from asam_tune.runtime.placement import place, preserved_placement
from asam_tune.steptiming import fresh_model, synthetic_batches, time_sgd
from asam_tune.workloads import Workload, load_workload

TARGET_RATIO = 1.10  # asynchronous SAM / SGD, the target
ROLLING_WINDOW = 20
WARMUP = 10  # SGD steps dropped before timing

# A competing process on one core: idle until it reads a line, then busy until its parent is
# gone. "torch" multiplies matrices on one thread (another job's compute); "python" spins in
# the interpreter.
_LOADS = {
    "torch": """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
import torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
parent = int(sys.argv[2])
sys.stdin.readline()
while os.getppid() == parent:
    for _ in range(20):
        a = torch.tanh(a @ a)
""",
    "python": """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
parent = int(sys.argv[2])
sys.stdin.readline()
while os.getppid() == parent:
    for _ in range(200_000):
        pass
""",
}


class CompetingLoad:
    """A competing CPU load on one core: started idle, busy from ``start()`` until ``stop()``."""

    def __init__(self, core: int, kind: str = "torch"):
        if kind not in _LOADS:
            raise UserInputError(f"Invalid load: {kind!r} (expected one of {sorted(_LOADS)})")
        self.kind = kind
        self.process = subprocess.Popen([sys.executable, "-c", _LOADS[kind], str(core), str(os.getpid())],
                                        stdin=subprocess.PIPE)

    def start(self) -> None:
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def ascent_times(workload: Workload, batch: tuple, sizes: list[int], rho: float, repeats: int = 15) -> dict[int, float]:
    """Median time of the ascent (forward, backward, norm) at each ``b_p``, in this process."""
    model = workload.build().train()
    x, y = batch
    params = [p for p in model.parameters() if p.requires_grad]
    loss = OutputTargetLoss(workload.loss_fn)
    medians = {}
    for b in sizes:
        samples = []
        for i in range(repeats + 3):
            started = time.perf_counter()
            ascent_perturbation(model, loss, (x[:b], y[:b]), params, rho)
            if i >= 3:  # warm-up
                samples.append(time.perf_counter() - started)
        medians[b] = statistics.median(samples)
    return medians


def hiding_batch_size(medians: dict[int, float], budget_s: float, batch_size: int) -> int:
    """The largest b_p whose fitted time ``a + k * b_p`` fits in ``budget_s`` (1 to B)."""
    xs, ys = list(medians), list(medians.values())
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0
    if slope <= 0:
        return batch_size
    fitted = math.floor((budget_s - (mean_y - slope * mean_x)) / slope)
    return max(1, min(batch_size, fitted))


def rolling_ratios(times: list[float], baseline_s: float, window: int = ROLLING_WINDOW) -> list[float | None]:
    """Median of the last ``window`` step times / the baseline, per step (None until a full window)."""
    return [None if i + 1 < window else statistics.median(times[i + 1 - window: i + 1]) / baseline_s
            for i in range(len(times))]


def first_within(ratios: list[float | None], start: int = 0, target: float = TARGET_RATIO) -> int | None:
    return next((i for i in range(start, len(ratios)) if ratios[i] is not None and ratios[i] <= target), None)


def first_above(ratios: list[float | None], start: int = 0, target: float = TARGET_RATIO) -> int | None:
    return next((i for i in range(start, len(ratios)) if ratios[i] is not None and ratios[i] > target), None)


def run_adapting(workload: Workload, batches: list, initial_bp: int, worker_core: int, *, rho: float, lr: float,
                 staleness: int | str = 1, on_step: Callable[[int], None] = lambda step: None) -> dict:
    """Asynchronous SAM with adaptation on: per-step time and the b_p each step left for the next job."""
    model, optimizer = fresh_model(workload, torch.device("cpu"), lr)
    times, sizes = [], []
    with AsyncSAM(model, optimizer, workload.loss_fn, rho, perturbation_device="cpu", threads=1,
                  cores=(worker_core,), perturbation_batch_size=initial_bp, staleness=staleness,
                  adapt=True) as sam:
        for step, (x, y) in enumerate(sam.lookahead(batches)):
            on_step(step)
            started = time.perf_counter()
            sam.step(x, y)
            times.append(time.perf_counter() - started)
            sizes.append(sam.perturbation_batch_size)
        stats = sam.stats()
    return {"initial_bp": initial_bp, "step_times_s": times, "b_p": sizes,
            "trajectory": [list(entry) for entry in stats.perturbation_batch_size_trajectory],
            "wait_median_s": stats.wait_median_s, "worker_compute_median_s": stats.worker_compute_median_s,
            "staleness_histogram": {str(k): v for k, v in stats.staleness_histogram.items()},
            "fallbacks": stats.fallbacks}


def _summarise(run: dict, sgd_s: float, ratios: list[float | None], back: int | None) -> dict:
    """``back``: the step the rolling ratio came back to the target (None: never)."""
    times = run["step_times_s"]
    tail = times[-max(ROLLING_WINDOW, len(times) // 4):]
    after = [r for r in ratios[back:] if r is not None] if back is not None else []
    return {"rolling_ratio": ratios, "back_within_target_step": back,
            "share_within_target_after": (sum(r <= TARGET_RATIO for r in after) / len(after)) if after else None,
            "final_ratio": ratios[-1], "tail_ratio": statistics.median(tail) / sgd_s, "tail_steps": len(tail),
            "final_b_p": run["b_p"][-1]}


def _with_load(load: CompetingLoad, run: Callable[[Callable[[int], None]], dict], load_at: int) -> dict:
    """``run(on_step)`` with ``load`` started at step ``load_at`` (0: before the first step)."""
    if load_at == 0:
        load.start()

    def on_step(step: int) -> None:
        if step == load_at and load_at > 0:
            load.start()

    return run(on_step)


def run_adapt_bench(workload: Workload | str, batch_size: int, *, steps: int = 400, initial_bp: int | None = None,
                    load_at: int | None = None, load: str = "torch", main_core: int = 0, worker_core: int = 1,
                    rho: float = 0.05, lr: float = 0.01, sgd_steps: int = 100, staleness: int | str = 1,
                    progress: Callable[[str], None] = lambda message: None) -> dict:
    """The two scenarios (module docstring); the caller's affinity and threads are restored after."""
    if staleness not in (1, "non_blocking"):
        raise UserInputError(f"Invalid staleness: {staleness!r} (adaptation needs 1 or 'non_blocking')")
    with preserved_placement():
        return _run_adapt_bench(workload, batch_size, steps=steps, initial_bp=initial_bp, load_at=load_at,
                                load=load, main_core=main_core, worker_core=worker_core, rho=rho, lr=lr,
                                sgd_steps=sgd_steps, staleness=staleness, progress=progress)


def _run_adapt_bench(workload: Workload | str, batch_size: int, *, steps: int, initial_bp: int | None,
                     load_at: int | None, load: str, main_core: int, worker_core: int, rho: float, lr: float,
                     sgd_steps: int, staleness: int | str, progress: Callable[[str], None]) -> dict:
    if steps < 2 * ROLLING_WINDOW:
        raise UserInputError(f"Invalid steps: {steps!r} (need at least {2 * ROLLING_WINDOW})")
    load_at = max(ROLLING_WINDOW, steps // 4) if load_at is None else load_at
    if not ROLLING_WINDOW <= load_at < steps:
        raise UserInputError(f"Invalid load_at: {load_at!r} (expected a step in [{ROLLING_WINDOW}, {steps}))")
    if load not in _LOADS:
        raise UserInputError(f"Invalid load: {load!r} (expected one of {sorted(_LOADS)})")
    usable = usable_core_ids()
    if not can_pin() or main_core == worker_core or not {main_core, worker_core} <= set(usable):
        raise UserInputError(f"main core {main_core} and worker core {worker_core} must be two distinct usable "
                             f"cores of {list(usable)} on a machine that can pin processes")
    if isinstance(workload, str):
        workload = load_workload(workload)
    result: dict = {**provenance(), "workload": workload.name, "batch_size": batch_size, "steps": steps,
                    "rho": rho, "lr": lr, "main_core": main_core, "worker_core": worker_core, "load": load,
                    "staleness": staleness,
                    "target_ratio": TARGET_RATIO, "rolling_window": ROLLING_WINDOW,
                    "loadavg_start": os.getloadavg()}
    place((main_core,), 1)
    batches = synthetic_batches(workload, batch_size, max(steps, WARMUP + sgd_steps), torch.device("cpu"))

    def sgd_times() -> list[float]:
        return time_sgd(workload, batches[:WARMUP + sgd_steps], torch.device("cpu"), WARMUP, lr)

    def adapting(initial: int) -> Callable[[Callable[[int], None]], dict]:
        return lambda on_step: run_adapting(workload, batches[:steps], initial, worker_core, rho=rho, lr=lr,
                                            staleness=staleness, on_step=on_step)


    progress(f"SGD on core {main_core}")
    sgd_idle = sgd_times()
    sizes = sorted({max(1, batch_size // 8), max(1, batch_size // 4), max(1, batch_size // 2), batch_size})
    medians = ascent_times(workload, batches[0], sizes, rho)
    hides = hiding_batch_size(medians, statistics.median(sgd_idle), batch_size)
    result["estimate"] = {"ascent_median_s": {str(b): t for b, t in medians.items()}, "hiding_bp": hides,
                          "how": f"ascent timed on core {main_core} alone, fitted a + k*b_p, largest b_p "
                                 "within one SGD step: the b_p a plan made on the idle machine would give"}
    wrong = hides if initial_bp is None else initial_bp
    if not 1 <= wrong <= batch_size:
        raise UserInputError(f"Invalid initial_bp: {initial_bp!r} (expected 1 to {batch_size})")

    progress(f"asynchronous SAM from b_p = {wrong} with a {load} load on core {worker_core} from the start")
    competing = CompetingLoad(worker_core, load)
    try:
        wrong_plan = _with_load(competing, adapting(wrong), 0)
        progress("SGD with the load still running")
        sgd_loaded = sgd_times()
    finally:
        competing.stop()
    progress("SGD on the idle machine again")
    sgd_idle += sgd_times()
    progress(f"asynchronous SAM from b_p = {hides}, a {load} load on core {worker_core} from step {load_at}")
    competing = CompetingLoad(worker_core, load)
    try:
        mid_run = _with_load(competing, adapting(hides), load_at)
        progress("SGD with the load still running")
        sgd_loaded += sgd_times()
    finally:
        competing.stop()

    # Pooled: on a shared machine the baseline drifts between its measurements.
    idle_s, loaded_s = statistics.median(sgd_idle), statistics.median(sgd_loaded)
    result["sgd"] = {"step_median_s": idle_s, "under_load_median_s": loaded_s,
                     "load_slows_sgd_by": loaded_s / idle_s - 1, "steps_each": sgd_steps}

    ratios = rolling_ratios(wrong_plan["step_times_s"], loaded_s)
    result["wrong_plan"] = {**wrong_plan, **_summarise(wrong_plan, loaded_s, ratios, first_within(ratios)),
                            "wrong_by": wrong / wrong_plan["b_p"][-1],
                            "final_ratio_vs_idle_sgd": rolling_ratios(wrong_plan["step_times_s"], idle_s)[-1]}

    ratios = rolling_ratios(mid_run["step_times_s"], idle_s)
    # Before the load: judged against idle SGD; from the load on, against SGD under load.
    ratios[load_at:] = rolling_ratios(mid_run["step_times_s"], loaded_s)[load_at:]
    degraded = first_above(ratios, load_at)  # None: the load never pushed it above the target
    back = first_within(ratios, degraded) if degraded is not None else None
    result["competing_load"] = {**mid_run, **_summarise(mid_run, loaded_s, ratios, back), "load_at": load_at,
                                "first_above_target_after_load_step": degraded,
                                "steps_to_recover": None if back is None else back - load_at,
                                "final_ratio_vs_idle_sgd": rolling_ratios(mid_run["step_times_s"], idle_s)[-1]}
    result["loadavg_end"] = os.getloadavg()
    return result


def report(result: dict) -> str:
    def ratio(value):
        return "-" if value is None else f"{value:.3f}"

    w, c = result["wrong_plan"], result["competing_load"]
    lines = [
        f"{result['workload']}, B={result['batch_size']}, {result['steps']} steps; main core {result['main_core']}, "
        f"worker core {result['worker_core']}, {result['load']} load, staleness {result['staleness']}; load average "
        f"{result['loadavg_start'][0]:.2f} -> {result['loadavg_end'][0]:.2f}; {result['date']}; "
        f"commit {result['commit']}",
        f"SGD median step {result['sgd']['step_median_s'] * 1e3:.3f} ms idle, "
        f"{result['sgd']['under_load_median_s'] * 1e3:.3f} ms under the load; b_p that hides on the idle "
        f"machine (estimated) {result['estimate']['hiding_bp']}",
        f"wrong plan (load from step 0): b_p {w['initial_bp']} -> {w['final_b_p']} ({w['wrong_by']:.2f}x too "
        f"large); rolling ASAM/SGD <= {TARGET_RATIO} from step {w['back_within_target_step']}; final "
        f"{ratio(w['final_ratio'])} (vs idle SGD {ratio(w['final_ratio_vs_idle_sgd'])}), last {w['tail_steps']} "
        f"steps {ratio(w['tail_ratio'])}; trajectory {w['trajectory']}",
        f"load from step {c['load_at']}: above target from step {c['first_above_target_after_load_step']}, "
        f"back at step {c['back_within_target_step']} ({c['steps_to_recover']} steps after the load began); "
        f"final {ratio(c['final_ratio'])} (vs idle SGD {ratio(c['final_ratio_vs_idle_sgd'])}), last "
        f"{c['tail_steps']} steps {ratio(c['tail_ratio'])}; trajectory {c['trajectory']}",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="mnist1d-cnn", metavar="NAME",
                        help=f"built-in workload: {', '.join(types.BUILTIN_WORKLOADS)} (default: mnist1d-cnn)")
    parser.add_argument("--batch-size", type=types.positive_int, default=100, metavar="B",
                        help="training batch size (default 100)")
    parser.add_argument("--steps", type=types.positive_int, default=400, metavar="N",
                        help="asynchronous-SAM steps per scenario (default 400)")
    parser.add_argument("--initial-bp", type=types.positive_int, default=None, metavar="B_P",
                        help="the b_p the wrong plan starts from (default: what hides on the idle machine)")
    parser.add_argument("--load-at", type=types.positive_int, default=None, metavar="STEP",
                        help="step at which the competing load starts (default: steps / 4)")
    parser.add_argument("--load", choices=sorted(_LOADS), default="torch",
                        help="the competing load on the worker's core (default: torch)")
    parser.add_argument("--staleness", choices=["1", "non_blocking"], default="1",
                        help="1 (wait for a late worker) or non_blocking (never wait; default: 1)")
    parser.add_argument("--main-core", type=types.non_negative_int, default=0, metavar="CORE",
                        help="the core the main process runs on (default 0)")
    parser.add_argument("--worker-core", type=types.non_negative_int, default=1, metavar="CORE",
                        help="the core the worker and the competing load run on (default 1)")
    parser.add_argument("--sgd-steps", type=types.positive_int, default=100, metavar="N",
                        help="SGD steps per baseline measurement (default 100)")
    parser.add_argument("--rho", type=types.non_negative_float, default=0.05, help="SAM's radius (default 0.05)")
    parser.add_argument("--lr", type=types.positive_float, default=0.01, help="SGD's learning rate (default 0.01)")
    parser.add_argument("--output", default=None, metavar="JSON", help="write the full result as JSON here")


def run(args: argparse.Namespace) -> int:
    result = run_adapt_bench(args.workload, args.batch_size, steps=args.steps, initial_bp=args.initial_bp,
                             load_at=args.load_at, load=args.load, main_core=args.main_core,
                             worker_core=args.worker_core, rho=args.rho, lr=args.lr, sgd_steps=args.sgd_steps,
                             staleness=1 if args.staleness == "1" else "non_blocking",
                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    return emit_result(result, args.output, report(result))


def main(argv=None) -> int:
    return types.script_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
