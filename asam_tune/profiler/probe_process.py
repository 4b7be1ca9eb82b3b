"""The parent's handle on one probe process (probe.py): start, talk, wait with timeouts, stop.

A probe is a plain ``subprocess`` running ``python -m asam_tune.profiler.probe`` (a fresh
interpreter: the same as a ``spawn`` start, and the environment is set before it begins).
Every wait has a deadline and notices a dead probe at once (end of its output); a probe that
crashes, hangs or reports an exception raises ``ProbeFailed`` with the reason, which the
profiler records as an 'error' point. ``close()`` asks, waits, then kills: no probe outlives
its handle, and probe.py also asks the kernel to kill it when the parent dies.
"""
from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asam_tune
from asam_tune.child_process import THREAD_VARIABLES, strip_launcher_variables
from asam_tune.records.profile import DeviceConfig

# Time for a probe to start Python, import torch and build the model before it says 'started'.
DEFAULT_START_TIMEOUT_S = 120.0


class ProbeFailed(Exception):
    """A probe process died, hung or reported an exception; the message says which."""


def _package_root() -> str:
    return str(Path(asam_tune.__file__).resolve().parent.parent)


def probe_environment(config: DeviceConfig) -> dict[str, str]:
    """The parent's environment, minus torchrun's variables, with the thread count set."""
    env = dict(os.environ)
    strip_launcher_variables(env)
    for name in THREAD_VARIABLES:
        env.pop(name, None)
        if config.threads is not None:
            env[name] = str(config.threads)
    root = _package_root()
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


class ProbeProcess:
    """One running probe. Use as a context manager so that it is always stopped."""

    def __init__(self, mode: str, config: DeviceConfig, request: dict[str, Any], *,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S):
        self.config = config
        self.mode = mode
        self.started: dict[str, Any] | None = None
        self._buffer = b""
        self._stderr = tempfile.TemporaryFile()
        full_request = {
            **request,
            "mode": mode,
            "config": config.model_dump(mode="json"),
            "parent_pid": os.getpid(),
            # The child sees the modules the parent sees (a user's package.module:factory).
            "sys_path": [p if p else os.getcwd() for p in sys.path],
        }
        self._process = subprocess.Popen(
            [sys.executable, "-m", "asam_tune.profiler.probe"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env=probe_environment(config), bufsize=0, close_fds=True)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._process.stdout, selectors.EVENT_READ)
        try:
            self.send(json.dumps(full_request, allow_nan=False))
            self.started = self.wait_for("started", start_timeout_s)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self._process.pid

    def __enter__(self) -> "ProbeProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, line: str) -> None:
        try:
            self._process.stdin.write(line.encode() + b"\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise ProbeFailed(self._death_message()) from None

    def next_event(self, timeout_s: float) -> dict[str, Any]:
        """The next event line; ``ProbeFailed`` on a reported error, death or timeout."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProbeFailed(f"{self._label()} gave no answer within {timeout_s:g} s")
            if not self._selector.select(remaining):
                continue
            chunk = os.read(self._process.stdout.fileno(), 65536)
            if not chunk:  # end of output: the probe is gone
                raise ProbeFailed(self._death_message())
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            event = json.loads(line)
        except ValueError:
            raise ProbeFailed(f"{self._label()} wrote a line that is not JSON: {line[:200]!r}") from None
        if event.get("event") == "error":
            raise ProbeFailed(f"{self._label()} failed: {event.get('message')}")
        return event

    def wait_for(self, name: str, timeout_s: float) -> dict[str, Any]:
        event = self.next_event(timeout_s)
        if event.get("event") != name:
            raise ProbeFailed(f"{self._label()} said {event.get('event')!r} where {name!r} was expected")
        return event

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask the probe to stop (end of its input), wait, then terminate, then kill."""
        process = self._process
        try:
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._selector.close()
        process.stdout.close()
        self._stderr.close()

    def abort(self) -> None:
        """Stop a probe that failed or hung: no polite wait, it may be stuck in a kernel."""
        if self._process.poll() is None:
            self._process.terminate()
        self.close(timeout_s=5.0)

    def _label(self) -> str:
        return f"{self.config.key} probe (pid {self._process.pid})"

    def _death_message(self) -> str:
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        how = "closed its output" if code is None else (
            f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
        tail = self._stderr_tail()
        return f"{self._label()} {how}" + (f": {tail}" if tail else "")

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            text = self._stderr.read()[-4000:].decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""


__all__ = ["ProbeProcess", "ProbeFailed", "probe_environment", "DEFAULT_START_TIMEOUT_S"]
