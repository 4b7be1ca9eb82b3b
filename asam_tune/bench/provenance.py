"""Machine, date and commit stamped on every benchmark result (no torch import)."""
from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

from asam_tune import __version__


def git_commit(start: Path | None = None) -> str | None:
    """The checkout's HEAD commit (with '+dirty' when the tree has changes), or None."""
    where = str(start or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def provenance() -> dict:
    from asam_tune.fingerprint import collect_fingerprint

    fp = collect_fingerprint()
    gpus = [g.name for g in fp.gpus]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "asam_tune_version": __version__,
        "machine": {
            "cpu": fp.cpu.model,
            "usable_cores": fp.cpu.usable_cores,
            "gpus": gpus,
            "torch": fp.torch_version,
            "cuda": fp.cuda_version,
            "python": platform.python_version(),
        },
    }


def emit_result(result: dict, output: str | None, summary: str) -> int:
    """What every benchmark script ends with: the full result as JSON at ``output`` (when
    given, written atomically), the human summary on stdout; exit code 0."""
    import json

    from asam_tune.records.base import write_atomic

    if output:
        write_atomic(output, json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(summary)
    return 0
