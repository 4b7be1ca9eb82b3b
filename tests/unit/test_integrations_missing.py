"""A trainer integration imported without its framework says in one line which extra to install."""
from __future__ import annotations

import importlib
import sys

import pytest


def test_lightning_callback_without_lightning_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)  # import lightning now raises ImportError
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "asam_tune.integrations.lightning", raising=False)
    with pytest.raises(ImportError) as caught:
        importlib.import_module("asam_tune.integrations.lightning")
    message = str(caught.value)
    assert "\n" not in message
    assert 'pip install "asam-tune[lightning]"' in message
