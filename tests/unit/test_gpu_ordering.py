"""The GPU paths' stream order, checked on the CPU through a recording fake CUDA layer.

``RecordingLayer`` stamps every copy, wait and NVTX range with a vector clock per stream, so
``ordered_before(a, b)`` says whether the GPU could start ``b`` before ``a`` is done, whatever
order the host issued them in. ``AsyncSAM`` drives the real ``StreamPerturber`` (its CUDA
calls through the fake) and records its NVTX ranges into the same layer.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asam_tune import AsyncSAM
from asam_tune.perturbers.device_layer import RecordingLayer
from asam_tune.perturbers.stream import StreamPerturber
from asam_tune.perturbers.tracing import nvtx_range, set_nvtx

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def layer():
    layer = RecordingLayer()
    before = set_nvtx(layer)
    yield layer
    set_nvtx(before)


def make_run(layer, steps: int = 4, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(steps)]
    sam = AsyncSAM(model, opt, F.cross_entropy, rho=0.05, nvtx=True, record_timeline=False,
                   perturber=lambda task: StreamPerturber(task, device="cpu", secondary_stream=True, layer=layer),
                   **options)
    return sam, batches


def one(layer, label):
    ops = [op for op in layer.ops if op.label == label]
    assert len(ops) == 1, (label, [op.label for op in layer.ops])
    return ops[0]


def test_handover_copy_then_ascent_then_apply_and_the_main_stream_never_waits_for_the_host(layer):
    sam, batches = make_run(layer)
    with sam:
        for batch in sam.lookahead(batches):
            sam.step(batch)
    before = layer.ordered_before
    ascents = layer.find("asam ascent")
    # Step 0's e_0 is computed at once (from w_0); then the job handed over in step s (from
    # w_s) serves step s+1. The last step has no successor: nothing is handed over in it.
    assert [op.label for op in ascents] == ["asam ascent 0:begin"] + [
        f"asam ascent {s}:begin" for s in range(len(batches) - 1)]
    applies = layer.find("asam apply")
    assert len(applies) == len(batches)
    assert before(ascents[0], applies[0])
    for served in range(1, len(batches)):
        ascent, s = ascents[served], served - 1
        assert ascent.stream != "main"
        earlier = ascents[served - 1]
        handover_copies = [op for op in layer.ops if op.label == "copy" and op.stream == ascent.stream
                           and earlier.stamp[ascent.stream] < op.stamp[op.stream] < ascent.stamp[ascent.stream]]
        assert handover_copies, f"no handover copy before the job handed over in step {s}"
        # The job reads w_s: after the main step s began (after the optimizer step of s-1) ...
        assert before(one(layer, f"asam step {s}:begin"), ascent)
        # ... the main stream overwrites w_s (apply of step s) only once the copies have read it ...
        assert all(before(c, applies[s]) for c in handover_copies)
        # ... but does not wait for the job itself: it runs beside the rest of step s ...
        assert not before(ascent, applies[s])
        # ... and its result is applied in step s+1, after the job.
        assert before(ascent, applies[served])
    # Only the worker's thread waits for the host; the main thread never does.
    assert layer.host_waits and all(thread.startswith("asam-perturbation") for thread, _ in layer.host_waits)


def test_the_recording_layer_tells_concurrent_work_from_ordered_work():
    layer = RecordingLayer()
    main, side = layer.main, layer.new_stream(torch.device("cpu"))
    a = layer.mark("a", main)
    b = layer.mark("b", side)
    assert not layer.ordered_before(a, b) and not layer.ordered_before(b, a)
    layer.wait_stream(side, main)
    c = layer.mark("c", side)
    assert layer.ordered_before(a, c) and layer.ordered_before(b, c)
    event = layer.record(side)
    d = layer.mark("d", main)
    assert not layer.ordered_before(c, d)
    layer.wait_event(main, event)
    e = layer.mark("e", main)
    assert layer.ordered_before(c, e) and not layer.ordered_before(e, c)


def test_nvtx_ranges_cover_the_main_step_the_handover_and_each_ascent_job(layer):
    sam, batches = make_run(layer, steps=3)
    with sam:
        for batch in sam.lookahead(batches):
            sam.step(batch)
    labels = [op.label for op in layer.ops if ":begin" in op.label]
    assert [label for label in labels if label.startswith("asam step")] == [f"asam step {s}:begin" for s in range(3)]
    # e_0 at once, then one job handed over in each step but the last
    assert [label for label in labels if label.startswith("asam ascent")] == [
        "asam ascent 0:begin", "asam ascent 0:begin", "asam ascent 1:begin"]
    assert labels.count("asam handover:begin") == 3 and labels.count("asam apply:begin") == 3


class CountingNvtx:
    def __init__(self):
        self.calls = []

    def range_push(self, message):
        self.calls.append(("push", message))

    def range_pop(self):
        self.calls.append(("pop",))

    def range_start(self, message):
        self.calls.append(("start", message))
        return len(self.calls)

    def range_end(self, ident):
        self.calls.append(("end", ident))


def test_nvtx_is_off_unless_asked_and_a_no_op_without_cuda(layer):
    fake = CountingNvtx()
    set_nvtx(fake)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    with AsyncSAM(model, opt, F.mse_loss, staleness=0) as sam:
        sam.step(x, y)
    assert fake.calls == []  # nvtx=False: nothing
    with AsyncSAM(model, opt, F.mse_loss, staleness=0, nvtx=True) as sam:
        sam.step(x, y)
    kinds = [c[0] for c in fake.calls]
    assert kinds.count("push") == kinds.count("pop") > 0 and kinds.count("start") == kinds.count("end") == 1
    set_nvtx(None)
    if not torch.cuda.is_available():  # torch.cuda.nvtx would raise here: the ranges do nothing
        with nvtx_range("anything"):
            pass
