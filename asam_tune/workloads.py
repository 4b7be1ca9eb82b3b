"""Workloads: a model factory plus what it takes and gives (input shape, classes, loss).

Three built-ins make every command run with no setup (``mnist1d-cnn``, ``resnet20``,
``vit-tiny``); a user's model comes in as ``package.module:factory``. Everything a worker
process receives (the model classes, ``build``, ``loss_fn``) is defined at module level or
re-imported by name, so a ``Workload`` pickles for ``spawn``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from asam_tune.errors import WorkloadError
from asam_tune.records import WorkloadDescriptor

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Workload:
    """A model to train: how to build it, what one sample looks like, how to score it."""

    name: str  # built-in name, or the 'package.module:factory' string it came from
    input_shape: tuple[int, ...]  # one sample, no batch dimension
    num_classes: int
    build: Callable[[], nn.Module]  # a fresh model on the CPU at each call
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    # The user's example_batch_fn(batch_size) -> (x, y); None means random inputs.
    batch_fn: Callable[[int], Batch] | None = None

    def make_batch(self, batch_size: int, *, generator: torch.Generator | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Batch:
        """A batch for timing: random inputs and labels, or the user's example batch.

        ``generator`` (a CPU generator) makes random batches reproducible; a user batch
        function draws its own. Floating inputs are cast to ``dtype``; labels stay integer.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise WorkloadError(f"batch size must be a positive integer, got {batch_size!r}")
        if self.batch_fn is None:
            x = torch.randn((batch_size, *self.input_shape), generator=generator)
            y = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        else:
            x, y = _checked_batch(self.name, self.batch_fn(batch_size), batch_size)
        if x.is_floating_point():
            x = x.to(dtype)
        return x.to(device), y.to(device)


# --------------------------------------------------------------------------------------------
# Built-in models


class MNIST1DCNN(nn.Module):
    """A small 1-D CNN for MNIST-1D, input (N, 1, 40); about 25k parameters.

    Flattened (not pooled) features: MNIST-1D's digits sit at particular positions, and the
    reference CNN of the MNIST-1D paper keeps the position too.
    """

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int, kernel: int, stride: int) -> list[nn.Module]:
            return [nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
                    nn.BatchNorm1d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(1, width, 5, 1),               # 40
            *block(width, width, 3, 2),           # 20
            *block(width, 2 * width, 3, 2),       # 10
            *block(2 * width, 2 * width, 3, 2),   # 5
        )
        self.classifier = nn.Linear(2 * width * 5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _ShortcutA(nn.Module):
    """He et al.'s option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, self.extra_channels - pad))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = _ShortcutA(c_out - c_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """The CIFAR ResNet of He et al. 2016 (6n+2 layers, 16/32/64 channels, option A)."""

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        stages: list[nn.Module] = []
        c_in = 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                stages.append(BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet20(num_classes: int = 10) -> ResNetCIFAR:
    return ResNetCIFAR(blocks_per_stage=3, num_classes=num_classes)


def encoder_blocks(dim: int, heads: int, mlp_ratio: float, depth: int) -> nn.Sequential:
    """Pre-norm transformer encoder layers (GELU, no dropout), batch first.

    A Sequential of layers rather than nn.TransformerEncoder: the latter warns about its
    nested-tensor fast path with norm_first=True and adds nothing here.
    """
    return nn.Sequential(*(
        nn.TransformerEncoderLayer(dim, heads, dim_feedforward=int(dim * mlp_ratio), dropout=0.0,
                                   activation="gelu", batch_first=True, norm_first=True)
        for _ in range(depth)))


class VisionTransformer(nn.Module):
    """A plain pre-norm ViT (class token, learned positions) built from torch.nn layers."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, channels: int = 3,
                 num_classes: int = 10, dim: int = 192, depth: int = 6, heads: int = 3,
                 mlp_ratio: float = 2.0):
        super().__init__()
        if image_size % patch_size:
            raise WorkloadError(f"image size {image_size} is not a multiple of patch size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = encoder_blocks(dim, heads, mlp_ratio, depth)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.blocks(tokens + self.pos_embed)
        return self.head(self.norm(tokens[:, 0]))


def vit_tiny(num_classes: int = 10) -> VisionTransformer:
    return VisionTransformer(num_classes=num_classes)


BUILTINS: dict[str, Workload] = {
    "mnist1d-cnn": Workload("mnist1d-cnn", (1, 40), 10, MNIST1DCNN),
    "resnet20": Workload("resnet20", (3, 32, 32), 10, resnet20),
    "vit-tiny": Workload("vit-tiny", (3, 32, 32), 10, vit_tiny),
}


def builtin_names() -> tuple[str, ...]:
    return tuple(sorted(BUILTINS))


# --------------------------------------------------------------------------------------------
# Loading


def parse_shape(text: str) -> tuple[int, ...]:
    """'3,32,32' -> (3, 32, 32); the per-sample shape given on the command line."""
    parts = [p.strip() for p in str(text).strip().strip("()[]").split(",")]
    if parts and parts[-1] == "":  # allow a trailing comma, as in '40,'
        parts.pop()
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise WorkloadError(f"invalid input shape {text!r}: expected positive integers separated "
                            "by commas, e.g. 3,32,32")
    return shape


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _resolve_factory(spec: str) -> Callable[[], object]:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise WorkloadError(f"invalid model spec {spec!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a user module may raise anything while importing
        raise WorkloadError(f"cannot import module {module_name!r} for {spec!r}: {_first_line(exc)}") from exc
    target: object = module
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise WorkloadError(f"module {module_name!r} has no attribute {attr_path!r} (from {spec!r})") from None
    if not callable(target):
        raise WorkloadError(f"{spec!r} is not callable: it is a {type(target).__name__}")
    return target


def _call_factory(spec: str) -> tuple[nn.Module, Callable[[int], Batch] | None]:
    factory = _resolve_factory(spec)
    try:
        result = factory()
    except Exception as exc:
        raise WorkloadError(f"factory {spec!r} raised {_first_line(exc)}") from exc
    batch_fn = None
    if isinstance(result, tuple) and len(result) == 2:
        result, batch_fn = result
        if not callable(batch_fn):
            raise WorkloadError(f"factory {spec!r} returned a batch function that is not callable: "
                                f"{type(batch_fn).__name__}")
    if not isinstance(result, nn.Module):
        raise WorkloadError(f"factory {spec!r} returned {type(result).__name__}; expected an "
                            "nn.Module or a tuple (nn.Module, example_batch_fn)")
    return result, batch_fn


def _checked_batch(name: str, batch: object, batch_size: int) -> Batch:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2
            and all(isinstance(t, torch.Tensor) for t in batch)):
        raise WorkloadError(f"example batch function of {name!r} must return (x, y) tensors, "
                            f"got {type(batch).__name__}")
    x, y = batch
    if x.ndim < 1 or x.shape[0] != batch_size or y.ndim < 1 or y.shape[0] != batch_size:
        raise WorkloadError(f"example batch function of {name!r} was asked for {batch_size} samples "
                            f"and returned x {tuple(x.shape)}, y {tuple(y.shape)}")
    return x, y


class UserFactory:
    """A picklable handle on ``package.module:factory``: a worker process re-imports it by name.

    The batch function the factory returned is kept in-process only (it may be a closure).
    """

    def __init__(self, spec: str):
        self.spec = spec
        self._batch_fn: Callable[[int], Batch] | None = None

    def __getstate__(self) -> dict:
        return {"spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        self.spec = state["spec"]
        self._batch_fn = None

    def build(self) -> nn.Module:
        model, self._batch_fn = _call_factory(self.spec)
        return model

    def example_batch(self, batch_size: int) -> Batch:
        if self._batch_fn is None:
            self.build()
        if self._batch_fn is None:
            raise WorkloadError(f"factory {self.spec!r} no longer returns an example batch function")
        return self._batch_fn(batch_size)


def _check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WorkloadError(f"{what} must be a positive integer, got {value!r}")
    return value


def _load_builtin(name: str, input_shape: tuple[int, ...] | None, num_classes: int | None) -> Workload:
    workload = BUILTINS[name]
    if input_shape is not None and tuple(input_shape) != workload.input_shape:
        raise WorkloadError(f"built-in workload {name!r} takes input shape {workload.input_shape}, "
                            f"got {tuple(input_shape)}")
    if num_classes is None or num_classes == workload.num_classes:
        return workload
    # partial of a module-level function pickles, so a resized built-in still goes to workers.
    return Workload(name, workload.input_shape, num_classes, partial(workload.build, num_classes=num_classes))


def _probe_forward(spec: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One forward on a throwaway model: a wrong input shape fails here with a clear message."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise WorkloadError(f"model {spec!r} fails on an input of shape {tuple(x.shape)}: "
                            f"{_first_line(exc)}") from exc
    if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise WorkloadError(f"model {spec!r} must return logits of shape (batch, classes), got {got}")
    return out


def load_workload(spec: str, *, input_shape: tuple[int, ...] | None = None,
                  num_classes: int | None = None) -> Workload:
    """A built-in name, or ``package.module:factory`` (imported: call only with trusted input).

    The factory takes no arguments and returns an ``nn.Module`` (then ``input_shape`` and
    ``num_classes`` are required) or ``(module, example_batch_fn)`` with
    ``example_batch_fn(batch_size) -> (x, y)``, from which the input shape is taken and, with the
    model's output, the number of classes. The factory is called once here to check it.
    """
    if input_shape is not None:
        input_shape = tuple(_check_positive_int(d, "input shape entry") for d in input_shape)
        if not input_shape:
            raise WorkloadError("input shape must have at least one dimension, got ()")
    if num_classes is not None:
        _check_positive_int(num_classes, "num_classes")
    if not isinstance(spec, str) or not spec.strip():
        raise WorkloadError(f"invalid model spec {spec!r}: expected a built-in name or package.module:factory")
    spec = spec.strip()
    if spec in BUILTINS:
        return _load_builtin(spec, input_shape, num_classes)
    if ":" not in spec:
        hint = ""
        if "." in spec:
            module_name, _, attr = spec.rpartition(".")
            hint = f" (did you mean '{module_name}:{attr}'?)"
        raise WorkloadError(f"unknown workload {spec!r}{hint}; built-ins are {', '.join(builtin_names())}, "
                            "or give package.module:factory")

    factory = UserFactory(spec)
    model = factory.build()
    if factory._batch_fn is None:
        missing = [flag for flag, value in (("--input-shape", input_shape), ("--num-classes", num_classes))
                   if value is None]
        if missing:
            raise WorkloadError(f"factory {spec!r} returned a bare nn.Module, so {' and '.join(missing)} "
                                "must be given")
        out = _probe_forward(spec, model, torch.randn((2, *input_shape)))
        if out.shape[-1] != num_classes and out.ndim == 2:
            raise WorkloadError(f"model {spec!r} outputs {out.shape[-1]} classes, but num_classes is {num_classes}")
        return Workload(spec, input_shape, num_classes, factory.build)

    x, _ = _checked_batch(spec, factory.example_batch(2), 2)
    example_shape = tuple(x.shape[1:])
    if input_shape is not None and input_shape != example_shape:
        raise WorkloadError(f"input shape {input_shape} disagrees with the example batch of {spec!r}, "
                            f"whose samples have shape {example_shape}")
    out = _probe_forward(spec, model, x)
    classes = num_classes if num_classes is not None else int(out.shape[1])
    return Workload(spec, example_shape, classes, factory.build, batch_fn=factory.example_batch)


# --------------------------------------------------------------------------------------------
# Identity of a model


def parameter_shapes_hash(named_parameters) -> str:
    """16 hex digits over the parameters' names and shapes, in order: the architecture's identity
    that profiles and plans record (``WorkloadDescriptor.parameter_shapes_hash``)."""
    shapes = [[name, list(p.shape)] for name, p in named_parameters]
    return hashlib.sha256(json.dumps(shapes, separators=(",", ":")).encode()).hexdigest()[:16]


def describe(workload: Workload, model: nn.Module) -> WorkloadDescriptor:
    """What a profile records about the model: size, architecture hash and dtype."""
    named = list(model.named_parameters())
    if not named:
        raise WorkloadError(f"model {workload.name!r} has no parameters to train")
    shapes_hash = parameter_shapes_hash(named)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in named})
    return WorkloadDescriptor(
        name=workload.name,
        input_shape=tuple(workload.input_shape),
        num_classes=workload.num_classes,
        parameter_count=sum(p.numel() for _, p in named),
        parameter_shapes_hash=shapes_hash,
        dtype=dtypes[0] if len(dtypes) == 1 else "mixed:" + ",".join(dtypes),
    )


def model_state_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes).

    Buffers count: BatchNorm's running statistics and ``num_batches_tracked`` are how a
    profiling or ascent pass would leave a trace on the model.
    """
    digest = hashlib.sha256()
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            # Raw bytes through a uint8 view: works for bfloat16 too, which numpy lacks.
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


__all__ = [
    "Workload", "BUILTINS", "builtin_names", "load_workload", "parse_shape", "describe", "parameter_shapes_hash",
    "model_state_fingerprint", "UserFactory", "MNIST1DCNN", "ResNetCIFAR", "BasicBlock",
    "VisionTransformer", "encoder_blocks", "resnet20", "vit_tiny",
]
