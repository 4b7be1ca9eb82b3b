"""Every package of the ``test`` extra is installed: the framework tests skip without theirs
(``importorskip``), and a skip must not pass for a run (CI installs ``.[test]``)."""
from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _test_requirements() -> list[str]:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    return [re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0] for requirement in extras["test"]]


@pytest.mark.parametrize("distribution", _test_requirements())
def test_the_test_extra_is_installed(distribution):
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{distribution} (the 'test' extra) is not installed: pip install -e \".[test]\"")


def test_the_frameworks_extras_are_in_the_test_extra():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    tested = set(extras["test"])
    for name in ("peers", "transformers", "lightning", "ray", "plot"):
        assert set(extras[name]) <= tested, name
