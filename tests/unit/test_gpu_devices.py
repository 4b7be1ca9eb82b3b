"""Where a GPU worker lands: devices read relative to the rank's own GPU, with fake GPUs.

Every rank of a torchrun job trains on its own GPU (``cuda:LOCAL_RANK``). A plan made on one
GPU names ``cuda:0`` (and a second stream of it) or ``cuda:1``: each rank must read that as
"my own GPU" and "one after mine", never as GPU 0 and GPU 1 for everyone. No CUDA is needed:
``torch.device("cuda", 3)`` is only a name, and the number of GPUs is passed in.
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch

from asam_tune.costmodel import make_plan as make_plan_with_floor
from asam_tune.errors import UserInputError
from asam_tune.runtime import distributed, options
from tests.fixtures.costmodel_profiles import affine, contention, profile

make_plan = functools.partial(make_plan_with_floor, min_perturbation_fraction=None)


def cuda(index: int) -> torch.device:
    return torch.device("cuda", index)


def parse(value, main, *, local_rank=None, gpus=8):
    return options.parse_device(value, main_device=main, local_rank=local_rank, cuda_count=gpus)


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_relative_forms_follow_the_ranks_own_gpu(rank):
    main = cuda(rank)
    assert parse("cuda", main) == main  # a second stream of the model's own GPU
    assert parse(torch.device("cuda"), main) == main
    assert parse("cuda:+0", main) == main
    assert parse("cuda:+4", main) == cuda(rank + 4)
    assert parse("cuda:5", main) == cuda(5)  # an absolute index stays absolute
    assert parse("cpu", main) == torch.device("cpu")
    assert parse(None, main) is None


def test_an_explicit_mapping_gives_each_local_rank_its_device(monkeypatch):
    mapping = {0: "cuda:4", 1: "cuda:5", 2: "cpu", 3: "cuda:+0"}
    assert [parse(mapping, cuda(r), local_rank=r) for r in range(4)] == [cuda(4), cuda(5), torch.device("cpu"),
                                                                          cuda(3)]
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's variable, when the rank is not given
    assert parse(mapping, cuda(1)) == cuda(5)
    monkeypatch.delenv("LOCAL_RANK")
    assert parse(mapping, cuda(0)) == cuda(4)  # no launcher: local rank 0


@pytest.mark.parametrize("value, main, gpus, message", [
    ("cuda:+1", cuda(7), 8, "'cuda:+1' is cuda:8 (the model is on cuda:7), but only 8 CUDA devices"),
    ("cuda:-1", cuda(0), 8, "'cuda:-1' is cuda:-1"),
    ("cuda", torch.device("cpu"), 8, "relative to the model's GPU, but the model is on cpu"),
    ("cuda:+1", torch.device("cpu"), 8, "relative to the model's GPU"),
    ("cuda:2", cuda(0), 0, "needs CUDA, which is not available here"),
    ("cuda:9", cuda(0), 8, "'cuda:9' is cuda:9, but only 8"),
    ({0: "cuda:1"}, cuda(1), 8, "no entry for local rank 1"),
    ({1: {1: "cuda:1"}}, cuda(1), 8, "is a mapping"),
    ("cuda:+x", cuda(0), 8, "'cuda:+x'"),
    ("tpu:0", cuda(0), 8, "'tpu:0'"),
    (3, cuda(0), 8, "3"),
])
def test_impossible_devices_are_one_line_errors(value, main, gpus, message):
    with pytest.raises(UserInputError) as info:
        parse(value, main, local_rank=1, gpus=gpus)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_bad_local_rank_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "first")
    with pytest.raises(UserInputError, match="LOCAL_RANK.*'first'"):
        options.local_rank_from_env()


# ----------------------------------------------------------------------------- plans


def stream_plan():
    devices = [affine("cuda:0", 0.01, 0.0001), affine("cuda:0+stream", 0.012, 0.0001), affine("cpu/4t", 0.002, 0.004)]
    plan = make_plan(profile(*devices, contention=[contention("cuda:0", "cuda:0+stream", 1.0)]), 100)
    assert plan.perturbation.key == "cuda:0+stream" and plan.perturbation.secondary_stream
    return plan


def other_gpu_plan(main: str = "cuda:0"):
    fast, slow = (0.001, 0.0001), (0.01, 0.0001)
    devices = [affine("cuda:0", *(slow if main == "cuda:0" else fast)),
               affine("cuda:1", *(fast if main == "cuda:0" else slow)), affine("cpu/4t", 0.01, 0.01)]
    plan = make_plan(profile(*devices), 100, main_device=main)
    assert plan.perturbation.device == ("cuda:1" if main == "cuda:0" else "cuda:0")
    return plan


def placed(plan, rank: int, gpus: int = 8):
    settings = options.settings_from_plan(plan)
    device, _, _ = options.worker_placement(settings, None, None, None, None, main_device=cuda(rank),
                                            cuda_count=gpus)
    return device


def test_a_plans_second_stream_is_each_ranks_own_gpu():
    plan = stream_plan()
    assert options.settings_from_plan(plan).device == "cuda:+0"
    assert [placed(plan, rank) for rank in range(4)] == [cuda(r) for r in range(4)]


def test_a_plans_other_gpu_is_an_offset_from_each_ranks_own():
    plan = other_gpu_plan()
    assert options.settings_from_plan(plan).device == "cuda:+1"
    assert [placed(plan, rank) for rank in range(3)] == [cuda(1), cuda(2), cuda(3)]
    backwards = other_gpu_plan(main="cuda:1")  # trained on cuda:1, the ascent on cuda:0
    assert options.settings_from_plan(backwards).device == "cuda:-1"
    assert placed(backwards, 1) == cuda(0)
    with pytest.raises(UserInputError, match="cuda:-1"):
        placed(backwards, 0)


def test_an_argument_overrides_the_plans_device():
    settings = options.settings_from_plan(other_gpu_plan())
    device, _, _ = options.worker_placement(settings, {0: "cuda:6", 1: "cuda:7"}, None, None, None,
                                            main_device=cuda(0), cuda_count=8)
    assert device == cuda(6)


# ----------------------------------------------------------------------------- ranks on one node


def entries(*pairs, node="a"):
    return [{"node": node, "main": main, "worker": worker} for main, worker in pairs]


def test_workers_beside_their_own_gpus_are_fine():
    assert distributed.worker_device_conflicts(entries(("cuda:0", "cuda:0"), ("cuda:1", "cuda:1"))) == ([], [])
    assert distributed.worker_device_conflicts(entries(("cuda:0", "cuda:2"), ("cuda:1", "cuda:3"))) == ([], [])
    # The same GPU numbers on two nodes are two GPUs.
    two_nodes = entries(("cuda:0", "cuda:1")) + entries(("cuda:0", "cuda:1"), node="b")
    assert distributed.worker_device_conflicts(two_nodes) == ([], [])


def test_a_worker_on_another_ranks_training_gpu_is_an_error_and_shared_workers_a_warning():
    # The bug this guards against: an absolute plan read as-is puts every rank's worker on cuda:1.
    errors, warns = distributed.worker_device_conflicts(entries(("cuda:0", "cuda:1"), ("cuda:1", "cuda:1")))
    assert errors == ["rank 0's perturbation worker is on cuda:1, rank 1's training GPU"] and warns == []
    errors, warns = distributed.worker_device_conflicts(
        entries(("cuda:0", "cuda:4"), ("cuda:1", "cuda:4"), ("cuda:2", "cpu")))
    assert errors == [] and warns == [([0, 1], "ranks [0, 1] share one perturbation GPU, cuda:4")]


def _fake_group(monkeypatch, reported, me):
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: len(reported))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda group=None: me)
    monkeypatch.setattr(distributed, "node_id", lambda: "a")

    def all_gather_object(out, obj, group=None):
        for i, (main, worker) in enumerate(reported):
            out[i] = obj if i == me else {"node": "a", "main": main, "worker": worker}

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)


def test_every_rank_refuses_a_collision_together(monkeypatch):
    reported = [("cuda:0", "cuda:1"), ("cuda:1", "cuda:2")]
    for me in range(2):  # rank 1's own placement is fine, but it must not wait for rank 0 forever
        _fake_group(monkeypatch, reported, me)
        with pytest.raises(UserInputError, match="rank 0's perturbation worker is on cuda:1.*'cuda:\\+K'"):
            distributed.check_worker_devices(object(), cuda(me), torch.device(reported[me][1]))


def test_only_the_ranks_sharing_a_gpu_are_warned(monkeypatch):
    reported = [("cuda:0", "cuda:4"), ("cuda:1", "cuda:4"), ("cuda:2", "cuda:5")]
    _fake_group(monkeypatch, reported, 0)
    with pytest.warns(RuntimeWarning, match=r"ranks \[0, 1\] share one perturbation GPU, cuda:4"):
        distributed.check_worker_devices(object(), cuda(0), cuda(4))
    _fake_group(monkeypatch, reported, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distributed.check_worker_devices(object(), cuda(2), cuda(5))
