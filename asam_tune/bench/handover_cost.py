"""What the main thread still pays per step to hand a job to the CPU worker, measured on a CPU.

    python -m asam_tune.bench.handover_cost --workloads resnet20,vit-tiny --output FILE.json

With the weights on a GPU, ``ProcessPerturber`` hands over on a copy stream (gather, copy to
page-locked shared memory, the job sent by a sender thread; the result copied up the same
way). A CPU cannot run that, but it can run the same code with the streams as host threads
(``HostThreadLayer``): the main thread then pays what it would on a GPU machine's host, plus
the gather it waits for (a device-to-device copy on a GPU). Three ways, one run, the same
model and worker each time:

  inline       every copy on the main thread, then the host waits for them: the structure of
               the GPU path before the copy stream (gather, copy to host, synchronize)
  copy-stream  the copy-stream path, streams as threads, the main thread waiting where the
               GPU's main stream waits (for the gather, and for the result's copy up)
  issue-only   the same, the main thread not waiting at all: what a GPU machine's host thread
               pays (the gather and the result's copy become waits of the main stream on the
               GPU, a device-to-device copy and a page-locked copy up, which a CPU cannot show)
  cpu-main     the plain CPU path (weights already in host memory), for reference

Per sample: the main thread's time in ``submit`` plus ``collect`` of a result already there
(the worker's compute in between is waited for outside the timer). Medians over the samples,
the machine's load average beside them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from asam_tune.arguments import csv, positive_int, script_main

MODES = ("inline", "copy-stream", "issue-only", "cpu-main")
ROWS = 2  # the job's batch rows: the fixed cost, as the profiler's handover point measures it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workloads", type=csv, default=("resnet20", "vit-tiny"), metavar="A,B",
                        help="built-in workloads (default resnet20,vit-tiny)")
    parser.add_argument("--samples", type=positive_int, default=30, metavar="N", help="timed handovers per mode")
    parser.add_argument("--output", metavar="FILE", help="write the result as JSON here")


def _layer(mode: str):
    from asam_tune.perturbers.device_layer import HostThreadLayer, RecordingLayer

    makers = {"inline": RecordingLayer, "copy-stream": HostThreadLayer,
              "issue-only": lambda: HostThreadLayer(block_main=False)}
    return makers.get(mode, lambda: None)()


def measure(workload_name: str, mode: str, samples: int) -> dict:
    import torch

    from asam_tune.perturbers.ascent import parameters_at, perturbed_indices
    from asam_tune.perturbers.base import AscentJob, AscentTask
    from asam_tune.perturbers.batches import OutputTargetLoss
    from asam_tune.perturbers.process_parent import ProcessPerturber
    from asam_tune.workloads import load_workload

    workload = load_workload(workload_name)
    model = workload.build()
    task = AscentTask(model, perturbed_indices(model, model.parameters()), OutputTargetLoss(workload.loss_fn))
    params = parameters_at(model, task.perturbed)
    batch = workload.make_batch(ROWS, generator=torch.Generator().manual_seed(0))
    layer = _layer(mode)
    submit_s, collect_s = [], []
    try:
        with ProcessPerturber(task, timeout_s=120, layer=layer) as worker:
            for i in range(samples + 3):
                started = time.perf_counter()
                worker.submit(AscentJob(i, params, batch, 0.05, seed=0))
                submitted = time.perf_counter()
                while not worker.ready():
                    time.sleep(1e-4)
                collecting = time.perf_counter()
                worker.collect(120)
                ended = time.perf_counter()
                if i >= 3:  # warm-up: buffers allocated and pinned, pipes primed
                    submit_s.append(submitted - started)
                    collect_s.append(ended - collecting)
    finally:
        if layer is not None and hasattr(layer, "close"):
            layer.close()
    total = [a + b for a, b in zip(submit_s, collect_s)]
    return {"workload": workload_name, "mode": mode,
            "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
            "main_median_s": statistics.median(total), "submit_median_s": statistics.median(submit_s),
            "collect_median_s": statistics.median(collect_s), "samples": samples}


def markdown(result: dict) -> str:
    machine = result["provenance"]["machine"]
    lines = [f"Machine: CPU {machine['cpu']} ({machine['usable_cores']} usable cores), torch {machine['torch']}; "
             f"date {result['provenance']['date']}; commit {result['provenance']['commit']}; load average "
             f"{result['load_average_before'][0]:.2f} before, {result['load_average_after'][0]:.2f} after. "
             "Command: `python -m asam_tune.bench.handover_cost`.", "",
             "| workload | weights MB | mode | main thread ms/step | submit ms | collect ms |",
             "|---|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['workload']} | {r['parameter_bytes'] / 2**20:.2f} | {r['mode']} | "
                     f"{1e3 * r['main_median_s']:.3f} | {1e3 * r['submit_median_s']:.3f} | "
                     f"{1e3 * r['collect_median_s']:.3f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import torch

    from asam_tune.bench.provenance import emit_result, provenance

    torch.set_num_threads(1)
    result = {"provenance": provenance(), "load_average_before": list(os.getloadavg()), "results": []}
    for name in args.workloads:
        for mode in MODES:
            print(f"[handover-cost] {name} {mode}", file=sys.stderr, flush=True)
            result["results"].append(measure(name, mode, args.samples))
    result["load_average_after"] = list(os.getloadavg())
    return emit_result(result, args.output, markdown(result))


def main(argv=None) -> int:
    return script_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
