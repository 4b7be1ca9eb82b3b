"""Built-in workloads, user factories, describe() and the model-state fingerprint."""
from __future__ import annotations

import itertools
import multiprocessing
import pickle
import sys
import textwrap

import pytest
import torch
from torch import nn

from asam_tune.errors import UserInputError, WorkloadError
from asam_tune.records import WorkloadDescriptor
from asam_tune.workloads import (
    BUILTINS,
    MNIST1DCNN,
    Workload,
    _ShortcutA,
    builtin_names,
    describe,
    load_workload,
    model_state_fingerprint,
    parse_shape,
    resnet20,
)

_counter = itertools.count()


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write ``source`` as a fresh importable module and return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(source: str) -> str:
        name = f"asam_user_model_{next(_counter)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name

    yield make


TINY = """
    import torch
    from torch import nn

    def model():
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 5))

    def with_batch():
        def batch(n):
            return torch.randn(n, 3, 4), torch.randint(0, 5, (n,))
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), batch
"""


# ----------------------------------------------------------------------------- built-ins


def test_builtin_names_are_the_registry():
    assert builtin_names() == ("mnist1d-cnn", "resnet20", "vit-tiny")
    assert set(builtin_names()) == set(BUILTINS)


@pytest.mark.parametrize("name", ["mnist1d-cnn", "resnet20", "vit-tiny"])
@pytest.mark.parametrize("batch_size", [2, 4])
def test_builtin_forward_backward(name, batch_size):
    workload = load_workload(name)
    torch.manual_seed(0)
    model = workload.build()
    x, y = workload.make_batch(batch_size, generator=torch.Generator().manual_seed(1))
    assert x.shape == (batch_size, *workload.input_shape)
    out = model(x)
    assert out.shape == (batch_size, workload.num_classes)
    workload.loss_fn(out, y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: {pname} got no gradient"


def _vit_parameter_count(dim=192, depth=6, mlp=384, patches=64, patch=4, channels=3, classes=10):
    attention = 4 * dim * dim + 4 * dim
    feed_forward = 2 * dim * mlp + mlp + dim
    layer = attention + feed_forward + 2 * 2 * dim
    embed = channels * patch * patch * dim + dim + dim + (patches + 1) * dim
    return embed + depth * layer + 2 * dim + dim * classes + classes


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 10_000 <= count(BUILTINS["mnist1d-cnn"].build()) <= 30_000
    # The reference ResNet-20 (He et al. 2016, option A) has 0.27M parameters: 269,722 exactly
    # in the widely used akamaster/pytorch_resnet_cifar10 implementation.
    assert count(BUILTINS["resnet20"].build()) == 269_722
    assert count(BUILTINS["vit-tiny"].build()) == _vit_parameter_count()


def test_resnet20_has_twenty_weighted_layers():
    model = resnet20()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 20
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]


def test_shortcut_a_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    out = _ShortcutA(16)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_builtin_num_classes_override_and_input_shape_check():
    workload = load_workload("resnet20", num_classes=100)
    assert workload.num_classes == 100
    assert workload.build()(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    restored = pickle.loads(pickle.dumps(workload))
    assert restored.build()(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    assert load_workload("vit-tiny", input_shape=(3, 32, 32)) is BUILTINS["vit-tiny"]
    with pytest.raises(WorkloadError, match=r"\(3, 64, 64\)"):
        load_workload("vit-tiny", input_shape=(3, 64, 64))


def test_make_batch_is_reproducible_and_typed():
    workload = BUILTINS["mnist1d-cnn"]
    a = workload.make_batch(8, generator=torch.Generator().manual_seed(3))
    b = workload.make_batch(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].dtype == torch.float32 and a[1].dtype == torch.int64
    assert 0 <= a[1].min() and a[1].max() < 10
    x, _ = workload.make_batch(3, dtype=torch.float64)
    assert x.dtype == torch.float64 and x.shape == (3, 1, 40)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(WorkloadError, match=repr(bad).replace(".", r"\.")):
            workload.make_batch(bad)


def test_workloads_pickle_for_spawned_workers():
    for name in builtin_names():
        restored = pickle.loads(pickle.dumps(BUILTINS[name]))
        assert restored.name == name
        assert isinstance(restored.build(), nn.Module)
        assert restored.loss_fn is BUILTINS[name].loss_fn


# ----------------------------------------------------------------------------- user factories


def test_factory_returning_a_module(user_module):
    mod = user_module(TINY)
    workload = load_workload(f"{mod}:model", input_shape=(3, 4), num_classes=5)
    assert (workload.name, workload.input_shape, workload.num_classes) == (f"{mod}:model", (3, 4), 5)
    assert workload.batch_fn is None
    model = workload.build()
    x, y = workload.make_batch(6)
    assert model(x).shape == (6, 5) and x.shape == (6, 3, 4)
    assert workload.build() is not model  # a fresh model each time


def test_factory_returning_module_and_batch_fn(user_module):
    mod = user_module(TINY)
    workload = load_workload(f"{mod}:with_batch")
    assert workload.input_shape == (3, 4) and workload.num_classes == 5
    x, y = workload.make_batch(7, dtype=torch.float64)
    assert x.shape == (7, 3, 4) and x.dtype == torch.float64 and y.shape == (7,)
    # After pickling (as for a worker) the batch function is found again through the factory.
    restored = pickle.loads(pickle.dumps(workload))
    x, y = restored.make_batch(3)
    assert x.shape == (3, 3, 4)
    assert restored.build()(x).shape == (3, 5)


def test_explicit_shape_must_agree_with_example_batch(user_module):
    mod = user_module(TINY)
    with pytest.raises(WorkloadError, match=r"\(12,\)"):
        load_workload(f"{mod}:with_batch", input_shape=(12,))


def test_batch_fn_returning_wrong_batch_size(user_module):
    mod = user_module("""
        import torch
        from torch import nn
        def factory():
            return nn.Linear(4, 2), lambda n: (torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    """)
    with pytest.raises(WorkloadError, match="asked for 2 samples"):
        load_workload(f"{mod}:factory")


def _error(spec, **kwargs) -> str:
    with pytest.raises(WorkloadError) as info:
        load_workload(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, UserInputError)
    return message


def test_unknown_builtin_lists_the_names():
    message = _error("resnet18")
    assert "'resnet18'" in message
    for name in builtin_names():
        assert name in message


def test_dotted_spec_without_colon_gets_a_hint():
    assert "did you mean 'mypkg.models:build'" in _error("mypkg.models.build")


@pytest.mark.parametrize("spec", ["", "   ", ":factory", "module:"])
def test_malformed_specs(spec):
    _error(spec)


def test_module_that_does_not_exist():
    message = _error("asam_no_such_module_xyz:factory")
    assert "asam_no_such_module_xyz" in message and "ModuleNotFoundError" in message


def test_module_that_raises_on_import(user_module):
    mod = user_module("raise RuntimeError('broken at import\\nsecond line')\n")
    message = _error(f"{mod}:factory")
    assert mod in message and "RuntimeError: broken at import" in message


def test_missing_attribute(user_module):
    mod = user_module(TINY)
    message = _error(f"{mod}:nope")
    assert "'nope'" in message and mod in message


def test_attribute_not_callable(user_module):
    mod = user_module("VALUE = 3\n")
    assert "not callable" in _error(f"{mod}:VALUE")


def test_factory_that_raises(user_module):
    mod = user_module("def factory():\n    raise ValueError('no weights found')\n")
    message = _error(f"{mod}:factory")
    assert "ValueError: no weights found" in message


@pytest.mark.parametrize("returned, expected", [("[1, 2]", "list"), ("None", "NoneType"),
                                               ("(1, 2, 3)", "tuple")])
def test_factory_returning_a_non_module(user_module, returned, expected):
    mod = user_module(f"def factory():\n    return {returned}\n")
    assert f"returned {expected}" in _error(f"{mod}:factory")


def test_factory_returning_non_callable_batch_fn(user_module):
    mod = user_module("from torch import nn\ndef factory():\n    return nn.Linear(2, 2), 5\n")
    assert "not callable" in _error(f"{mod}:factory")


def test_bare_module_needs_shape_and_classes(user_module):
    mod = user_module(TINY)
    message = _error(f"{mod}:model")
    assert "--input-shape and --num-classes" in message
    assert "--num-classes" in _error(f"{mod}:model", input_shape=(3, 4))
    assert "--input-shape" in _error(f"{mod}:model", num_classes=5)


def test_wrong_input_shape_fails_at_load(user_module):
    mod = user_module(TINY)
    message = _error(f"{mod}:model", input_shape=(3, 5), num_classes=5)
    assert "(2, 3, 5)" in message


def test_wrong_num_classes_fails_at_load(user_module):
    mod = user_module(TINY)
    assert "outputs 5 classes" in _error(f"{mod}:model", input_shape=(3, 4), num_classes=7)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"num_classes": 2.5}, {"input_shape": (3, 0)},
                                    {"input_shape": ()}])
def test_bad_shape_or_classes_values(kwargs):
    _error("resnet20", **kwargs)


def _build_in_child(workload: Workload, queue) -> None:
    model = workload.build()
    x, _ = workload.make_batch(2)
    queue.put((describe(workload, model).parameter_shapes_hash, tuple(model(x).shape)))


@pytest.mark.process
@pytest.mark.timeout(60)
def test_user_workload_builds_in_a_spawned_process(user_module):
    mod = user_module(TINY)
    workload = load_workload(f"{mod}:with_batch")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_build_in_child, args=(workload, queue))
    child.start()
    try:
        shapes_hash, out_shape = queue.get(timeout=50)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.terminate()
    assert shapes_hash == describe(workload, workload.build()).parameter_shapes_hash
    assert out_shape == (2, 5)


# ----------------------------------------------------------------------------- parse_shape


@pytest.mark.parametrize("text, shape", [("3,32,32", (3, 32, 32)), ("40", (40,)), (" 1, 40 ", (1, 40)),
                                         ("(3,32,32)", (3, 32, 32)), ("40,", (40,))])
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "3,a,32", "3,0,32", "-1", "3,,32", "3.5", "3x32x32"])
def test_parse_shape_rejects(text):
    with pytest.raises(WorkloadError, match="invalid input shape") as info:
        parse_shape(text)
    assert repr(text) in str(info.value)


# ----------------------------------------------------------------------------- describe / fingerprint


def test_describe_is_stable_and_tracks_architecture():
    workload = BUILTINS["mnist1d-cnn"]
    torch.manual_seed(0)
    first = describe(workload, workload.build())
    torch.manual_seed(1)  # the weights differ; the architecture does not
    second = describe(workload, workload.build())
    assert isinstance(first, WorkloadDescriptor)
    assert first == second
    assert first.parameter_count == sum(p.numel() for p in MNIST1DCNN().parameters())
    assert first.dtype == "float32" and first.input_shape == (1, 40) and first.num_classes == 10
    assert len(first.parameter_shapes_hash) == 16
    int(first.parameter_shapes_hash, 16)
    narrower = describe(workload, MNIST1DCNN(width=16))
    assert narrower.parameter_shapes_hash != first.parameter_shapes_hash
    wider_head = describe(workload, MNIST1DCNN(num_classes=11))
    assert wider_head.parameter_shapes_hash != first.parameter_shapes_hash
    assert describe(workload, MNIST1DCNN().double()).dtype == "float64"


def test_describe_rejects_a_model_without_parameters():
    with pytest.raises(WorkloadError, match="no parameters"):
        describe(BUILTINS["mnist1d-cnn"], nn.ReLU())


def test_state_fingerprint_sees_parameters_and_buffers():
    torch.manual_seed(0)
    model = MNIST1DCNN()
    torch.manual_seed(0)
    assert model_state_fingerprint(MNIST1DCNN()) == model_state_fingerprint(model)
    before = model_state_fingerprint(model)
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 1, 40))
    assert model_state_fingerprint(model) == before  # eval forward changes nothing
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 40))  # parameters untouched, BatchNorm statistics move
    assert model_state_fingerprint(model) != before

    model = MNIST1DCNN()
    before = model_state_fingerprint(model)
    model.features[1].num_batches_tracked += 1  # only the counter moves
    assert model_state_fingerprint(model) != before
    model.features[1].num_batches_tracked -= 1
    assert model_state_fingerprint(model) == before
    with torch.no_grad():
        model.classifier.bias[0] += 1e-6
    assert model_state_fingerprint(model) != before


def test_state_fingerprint_handles_bfloat16():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    before = model_state_fingerprint(model)
    with torch.no_grad():
        model.weight[0, 0] = model.weight[0, 0] + 1
    assert model_state_fingerprint(model) != before
