"""Placing the main process where a plan says: its cores and thread count, the worker's apart.

``AsyncSAM`` pins its worker; the main process is the caller's, so placing it is explicit:

    with main_process_placement("plan.json"):       # a Plan or its path
        ... build AsyncSAM, train ...

(with one rank; under torchrun ``AsyncSAM`` places each rank itself, see ``distributed.py``).
The block may be entered before or after ``AsyncSAM`` is built: while it holds, the machine's
fingerprint and the usable cores are those from before the placement (see
``fingerprint.placed_by_asam_tune``). Everything is restored on exit.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from asam_tune.errors import UserInputError
from asam_tune.fingerprint import placed_by_asam_tune, usable_core_ids
from asam_tune.records.plan import Plan
from asam_tune.affinity import allowed_cores, can_pin, pin_process


def main_placement(plan: Plan) -> tuple[torch.device, tuple[int, ...], int]:
    """The main device, the cores the main process runs on (not the worker's) and its threads."""
    usable = usable_core_ids()
    worker = set(plan.perturbation.cores or ()) if plan.worker_cores else set()
    free = [c for c in usable if c not in worker] or list(usable)
    cores = tuple(free[: plan.main_cores])
    device = torch.device(plan.main_device.split("/")[0])
    return device, cores, len(cores)


def place(cores: tuple[int, ...], threads: int) -> None:
    """Pin every thread of this process to ``cores`` and use ``threads`` intra-op threads."""
    if can_pin():
        pin_process(cores)
    torch.set_num_threads(threads)


@contextlib.contextmanager
def preserved_placement() -> Iterator[None]:
    """Restore this process's affinity and thread count on exit, whatever happened inside."""
    before_cores, before_threads = allowed_cores(), torch.get_num_threads()
    try:
        with placed_by_asam_tune(before_cores):
            yield
    finally:
        if before_cores is not None and can_pin():
            pin_process(before_cores)
        torch.set_num_threads(before_threads)


def _plan(plan: Plan | str | os.PathLike) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        from asam_tune.records import load_record

        return load_record(Plan, plan)
    raise UserInputError(f"main_process_placement needs a Plan or the path of one, got {type(plan).__name__}")


@contextlib.contextmanager
def main_process_placement(plan: Plan | str | os.PathLike) -> Iterator[tuple[torch.device, tuple[int, ...], int]]:
    """Inside the block the main process runs on the plan's main cores and threads.

    ``plan``: a ``Plan`` or its path, as ``AsyncSAM(plan=...)`` takes.
    """
    device, cores, threads = main_placement(_plan(plan))
    with preserved_placement():
        place(cores, threads)
        yield device, cores, threads
