"""The package's front door: public types importable from ``asam_tune``, no torch until used."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import asam_tune


def test_public_types_come_from_the_package():
    from asam_tune import AdaptationSettings, AsyncSAM, AsyncSAMStats, WorkerError
    from asam_tune.errors import WorkerError as ErrorsWorkerError
    from asam_tune.runtime.adaptation import AdaptationSettings as RuntimeSettings
    from asam_tune.runtime.async_sam import AsyncSAM as RuntimeAsyncSAM
    from asam_tune.runtime.stats import AsyncSAMStats as RuntimeStats

    assert (AsyncSAM, AdaptationSettings, AsyncSAMStats, WorkerError) == (
        RuntimeAsyncSAM, RuntimeSettings, RuntimeStats, ErrorsWorkerError)
    assert set(asam_tune.__all__) <= set(dir(asam_tune))


def test_importing_the_package_imports_no_torch_until_a_torch_type_is_used():
    code = ("import sys, asam_tune; assert 'torch' not in sys.modules, 'torch imported early'; "
            "asam_tune.WorkerError; assert 'torch' not in sys.modules; "
            "asam_tune.AsyncSAM; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_an_unknown_name_is_an_attribute_error():
    try:
        asam_tune.NoSuchThing
    except AttributeError as error:
        assert "NoSuchThing" in str(error)
    else:
        raise AssertionError("no AttributeError")


def test_the_package_ships_its_type_hints():
    assert (Path(asam_tune.__file__).parent / "py.typed").is_file()
