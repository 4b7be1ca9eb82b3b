"""Page-locking the CPU worker's shared buffers: a failure clears CUDA's error state and warns once."""
from __future__ import annotations

import warnings

import pytest
import torch

from asam_tune.perturbers.process_lifecycle import WorkerHandle, register_host


class FakeCudart:
    """Records the calls; ``cudaHostRegister`` answers ``codes`` in turn (or raises ``raising``)."""

    def __init__(self, codes=(), raising: Exception | None = None):
        self.codes = list(codes)
        self.raising = raising
        self.calls: list[str] = []
        self.error_state = 0  # what cudaGetLastError would report (and reset)

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append("register")
        if self.raising is not None:
            self.error_state = 1
            raise self.raising
        code = self.codes.pop(0)
        if code:
            self.error_state = code
        return code

    def cudaGetLastError(self):
        self.calls.append("get_last_error")
        code, self.error_state = self.error_state, 0
        return code


@pytest.mark.parametrize("cudart", [FakeCudart(codes=[712, 712]), FakeCudart(raising=RuntimeError("no driver"))],
                         ids=["error-code", "exception"])
def test_a_failed_registration_clears_the_error_state_and_warns_once(cudart):
    handle = WorkerHandle()
    buffers = [torch.zeros(8), torch.zeros(4)]
    with pytest.warns(RuntimeWarning, match="cudaHostRegister .* failed .*pageable") as record:
        assert register_host(handle, buffers[0], cudart) is False
        assert register_host(handle, buffers[1], cudart) is False
    assert len([w for w in record if "cudaHostRegister" in str(w.message)]) == 1
    assert cudart.calls == ["register", "get_last_error", "register", "get_last_error"]
    assert cudart.error_state == 0  # the next kernel launch would not see it
    assert handle.registered == []  # nothing to unregister at shutdown


def test_a_successful_registration_is_remembered_and_does_not_warn():
    cudart, handle, t = FakeCudart(codes=[0]), WorkerHandle(), torch.zeros(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert register_host(handle, t, cudart) is True
    assert cudart.calls == ["register"]
    assert handle.registered == [t.data_ptr()]


def test_an_empty_buffer_is_not_registered():
    cudart = FakeCudart()
    assert register_host(WorkerHandle(), torch.zeros(0), cudart) is False
    assert cudart.calls == []
