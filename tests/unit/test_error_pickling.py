"""Every error type of the project round-trips through pickle with its message and attributes.

Ray and torchrun show a rank's exception in the driver by unpickling it; an error whose
``__init__`` takes other arguments than its message used to arrive as a ``TypeError``.
"""
from __future__ import annotations

import importlib
import pickle
import pkgutil

import pytest

import asam_tune
from asam_tune.costmodel.plausibility import ImplausiblePlanError
from asam_tune.errors import (AsamTuneError, FingerprintMismatchError, RecordError, UserInputError,
                              WorkerError, WorkloadError)
from asam_tune.records.base import RecordProblem

EXAMPLES = [
    AsamTuneError("something went wrong"),
    UserInputError("--threads: expected a positive integer, got 'x'"),
    RecordError("plan.json", "$.device", "a device name", 3),
    RecordProblem("plan.json", "$.schema_version", "written by a newer asam-tune"),
    WorkloadError("unknown workload 'nope'"),
    FingerprintMismatchError("plan made on another machine"),
    WorkerError("the worker died", pid=123, signal=9, remote_traceback="Traceback ..."),
    ImplausiblePlanError("SAM faster than SGD"),
]

_SKIPPED_MODULES = ("asam_tune.perturbers.process_child",)  # a worker's entry point, run as __main__


def _all_error_classes() -> set[type]:
    for module in pkgutil.walk_packages(asam_tune.__path__, "asam_tune."):
        if module.name not in _SKIPPED_MODULES:
            importlib.import_module(module.name)
    found, todo = set(), [AsamTuneError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_class_has_an_example_here():
    missing = {cls.__qualname__ for cls in _all_error_classes()} - {type(e).__qualname__ for e in EXAMPLES}
    assert not missing, f"add an example of {sorted(missing)} to EXAMPLES"


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip_keeps_type_message_and_attributes(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_a_record_error_raised_in_another_process_arrives_with_its_message():
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with pytest.raises(RecordError, match=r"plan.json: at \$.device: expected a device name, got 3"):
            pool.submit(_raise_record_error).result(timeout=120)


def _raise_record_error():
    raise RecordError("plan.json", "$.device", "a device name", 3)
