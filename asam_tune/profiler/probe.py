"""A probe: one device configuration measured in its own process (``python -m`` this module).

``torch.set_num_threads`` is process-wide and the OpenMP pool is sized when torch loads, so a
CPU configuration gets a fresh process whose affinity and thread count are set *before*
torch is imported (the parent also puts ``child_process.THREAD_VARIABLES`` into its
environment and strips torchrun's variables: a probe is not a rank). The model
is rebuilt here from the workload spec (a built-in name or ``package.module:factory``, which
came from the command line or the API); no user object is ever unpickled.

Protocol: the parent writes one JSON request line to stdin; the probe answers with one JSON
event per line on its stdout (anything else that writes to stdout, e.g. a library warning,
is redirected to stderr so it cannot corrupt the protocol). Modes:

  sweep  {"event": "point", "point": BatchPoint} per batch size, then "done" (with
         "autocast": "bfloat16" the forward runs under autocast, as a low-precision ascent). With
         "serve": true the probe then stays up as the main device's server: it measures the
         weight transfers, the handover to a CPU worker and whole training steps when asked
         (see ``_serve``).
  busy   warms up, says "ready", then runs forward+backward non-stop until "stop", end of
         input, or ``max_busy_s``; then "done" with the number of iterations.

Every probe first says {"event": "started", "threads": ..., "affinity": [...]} (what torch and
the OS report, so the parent and the tests can check the configuration took effect). An
exception becomes {"event": "error", "message": ..., "traceback": ...} and exit code 1.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import IO, Any

# Torch-free, and shared with the perturbation worker so that the two never drift apart.
from asam_tune.child_process import set_parent_death_signal, set_thread_variables


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: the kernel kills this process when the parent dies (no orphaned probes)."""
    set_parent_death_signal(signal.SIGKILL)
    # The parent may have died before prctl took effect.
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(3)


def _configure_cpu(config: dict) -> None:
    """Affinity and thread count, before torch is imported."""
    cores = config.get("cores")
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    threads = config.get("threads")
    if threads:
        set_thread_variables(os.environ, threads)


class _Channel:
    def __init__(self, out: IO[str]):
        self._out = out

    def send(self, event: str, **payload: Any) -> None:
        self._out.write(json.dumps({"event": event, **payload}, allow_nan=False) + "\n")
        self._out.flush()


def _settings(request: dict):
    from asam_tune.timing import MeasureSettings

    return MeasureSettings(**request["settings"])


def _device(request: dict):
    from asam_tune.devices.torch_device import TorchComputeDevice
    from asam_tune.records.profile import DeviceConfig
    from asam_tune.workloads import load_workload

    spec = request["workload"]
    shape = spec.get("input_shape")
    workload = load_workload(spec["spec"], input_shape=tuple(shape) if shape else None,
                             num_classes=spec.get("num_classes"))
    config = DeviceConfig.model_validate_json(json.dumps(request["config"]))
    return TorchComputeDevice(workload, config, autocast_dtype=request.get("autocast"))


def _run_sweep(request: dict, channel: _Channel) -> None:
    from asam_tune.profiler.sweep import sweep
    from asam_tune.timing import PerfClock

    device = _device(request)
    points = sweep(device, request["batch_sizes"], _settings(request), PerfClock(),
                   on_point=lambda p: channel.send("point", point=p.model_dump(mode="json")))
    channel.send("done", count=len(points))
    if request.get("serve"):
        _serve(device, request, channel)
    device.close()


def _serve(device, request: dict, channel: _Channel) -> None:
    """The main device's server: transfers, handovers and whole training steps, on request.

    Commands, one JSON object per line: {"cmd": "transfers", "numel": N, "dtype": "float32",
    "targets": ["cpu", "cuda:1"]}; {"cmd": "handover", "threads": k, "cores": [...]} (a CPU
    worker's per-step cost to this process: "handover" with "stats", or with "error" when the
    worker failed, the probe staying up); {"cmd": "prepare", "batch_size": B} (warms up, then
    "ready"); {"cmd": "measure"} (times one training step at B); {"cmd": "quit"}.
    """
    from asam_tune.timing import PerfClock, measure_with

    settings = _settings(request)

    def step() -> None:
        device.forward_backward()
        device.optimizer_step()

    for line in sys.stdin:
        command = json.loads(line)
        name = command.get("cmd")
        if name == "transfers":
            channel.send("transfers", results=_transfers(device.config.device, command, settings))
        elif name == "handover":
            channel.send("handover", **_handover(device, command, settings))
        elif name == "prepare":
            device.release()
            device.prepare(int(command["batch_size"]))
            for _ in range(max(settings.warmup, 1)):
                step()
            device.synchronize()
            channel.send("ready")
        elif name == "measure":
            stats = measure_with(step, sync=device.synchronize, clock=PerfClock(), settings=settings)
            channel.send("measured", stats=stats.model_dump(mode="json"))
        elif name == "quit":
            break
        else:
            raise ValueError(f"unknown command {command!r}")
    device.release()


def _transfers(source: str, command: dict, settings) -> dict:
    import torch

    from asam_tune.profiler.transfers import measure_copy_pair
    from asam_tune.timing import PerfClock

    dtype = getattr(torch, command["dtype"])
    results = {}
    for target in command["targets"]:
        to_target, to_source, pinned = measure_copy_pair(
            int(command["numel"]), dtype, torch.device(source), torch.device(target),
            settings=settings, clock=PerfClock())
        results[target] = {"to_target": to_target.model_dump(mode="json"),
                           "to_source": to_source.model_dump(mode="json"), "pinned": pinned}
    return results


def _handover(device, command: dict, settings) -> dict:
    """{"stats": ..., "weights_on": ...}, or {"error": ...}: a worker that cannot start must not
    end the server. The weights are on the probe's device, as the main step's are."""
    from asam_tune.profiler.handover import measure_handover
    from asam_tune.timing import PerfClock

    cores = command.get("cores")
    try:
        stats = measure_handover(device.workload, int(command["threads"]), tuple(cores) if cores else None,
                                 settings=settings, clock=PerfClock(), device=device.config.device)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which records nothing
        return {"error": _first_line(exc)}
    return {"stats": stats.model_dump(mode="json"), "weights_on": device.config.device}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _run_busy(request: dict, channel: _Channel) -> None:
    device = _device(request)
    device.prepare(request["batch_size"])
    device.forward_backward()
    device.synchronize()
    stop = threading.Event()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    channel.send("ready")
    deadline = time.monotonic() + float(request.get("max_busy_s", 300.0))
    iterations = 0
    while not stop.is_set() and time.monotonic() < deadline:
        device.forward_backward()
        device.synchronize()
        iterations += 1
    channel.send("done", iterations=iterations)
    device.close()


MODES = {"sweep": _run_sweep, "busy": _run_busy}


def main() -> int:
    # The protocol keeps the real stdout; fd 1 becomes stderr for everything else.
    channel = _Channel(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)
    try:
        request = json.loads(sys.stdin.readline())
        _die_with_parent(request.get("parent_pid"))
        for entry in reversed(request.get("sys_path", [])):
            if entry not in sys.path:
                sys.path.insert(1, entry)
        config = request["config"]
        if config["device"] == "cpu":
            _configure_cpu(config)
        import torch  # only now: affinity and OMP_NUM_THREADS are in place

        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        channel.send("started", pid=os.getpid(), threads=torch.get_num_threads(), affinity=affinity)
        MODES[request["mode"]](request, channel)
        return 0
    except BaseException as exc:  # everything goes back to the parent, then a clean exit
        try:
            channel.send("error", message=_first_line(exc), traceback=traceback.format_exc())
        except Exception:
            pass
        return 1


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Skip the interpreter's teardown (a second of CPU with torch loaded) that would overlap
    # the next probe's measurement; every answer has been flushed already.
    os._exit(code)
