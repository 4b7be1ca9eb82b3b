"""What ``AsyncSAM`` runs with: a plan's choices, overridden by arguments, every one checked.

The only module that reads ``Plan`` attributes (asam_tune/records/plan.py). Each check names
the argument and the bad value, as torch.optim's do.
"""
from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from asam_tune.errors import FingerprintMismatchError, UserInputError
from asam_tune.records.rho_rule import DEFAULT_RHO_RULE, NO_RHO_RULE, RhoRule
from asam_tune.runtime.adaptation import AdaptationSettings

__all__ = ["PlanSettings", "adaptation_settings", "check_device_form", "check_inputs", "check_rho", "check_staleness",
           "load_plan", "local_rank_from_env", "main_device_of", "one_batch", "parse_device", "plan_device",
           "positive_int", "rho_rule_from", "settings_from_plan", "worker_placement"]

STALENESS_VALUES = (0, 1, "non_blocking")
# Plan.mode -> staleness
PLAN_MODES = {"synchronous": 0, "staleness1": 1, "non_blocking": "non_blocking"}
FAILURE_POLICIES = ("fallback", "raise")


@dataclass(frozen=True)
class PlanSettings:
    """What the runtime takes from a plan; every field may be overridden by an argument."""

    device: str | None = None
    threads: int | None = None
    cores: tuple[int, ...] | None = None
    batch_size: int | None = None
    staleness: int | str | None = None
    training_batch_size: int | None = None  # B: the largest b_p adaptation may grow to
    rho_rule: RhoRule | None = None
    floor_fraction: float | None = None  # the plan's quality floor on b_p / B
    # Per rank, for dividing a node's cores among torchrun's ranks (runtime/distributed.py).
    main_cores: int | None = None
    reserved_cores: int = 0
    nproc_per_node: int | None = None
    ascent_dtype: str | None = None  # the autocast dtype the plan's ascent times were measured in


def load_plan(plan: Any, allow_other_machine: bool) -> Any:
    """A ``Plan`` (or its path), checked to be from this machine unless told otherwise."""
    if isinstance(plan, (str, os.PathLike)):
        from asam_tune.records import load_record
        from asam_tune.records.plan import Plan

        plan = load_record(Plan, plan)
    fingerprint = getattr(plan, "profile_fingerprint", None)
    if fingerprint is not None and not allow_other_machine:
        from asam_tune.fingerprint import collect_fingerprint
        from asam_tune.records.fingerprint import fingerprint_differences

        differences = fingerprint_differences(fingerprint, collect_fingerprint())
        if differences:
            raise FingerprintMismatchError(
                f"plan was made on another machine ({'; '.join(differences)}); "
                "pass allow_other_machine=True to use it anyway")
    return plan


def settings_from_plan(plan: Any) -> PlanSettings:
    """A "synchronous" plan means the perturbation device cannot beat SAM in-process, so the
    worker is the in-process one whatever device the plan names. A GPU worker's device is read
    relative to the rank's own GPU (``plan_device``): the plan's ``secondary_stream`` means the
    model's own GPU on every rank. Plans written before rho rules existed keep rho fixed.
    """
    perturbation = plan.perturbation
    mode = plan.mode
    if mode not in PLAN_MODES:
        raise UserInputError(f"plan mode must be one of {sorted(PLAN_MODES)}, got {mode!r}")
    cores = getattr(perturbation, "cores", None)
    in_process = mode == "synchronous" or perturbation.device is None
    return PlanSettings(
        device=None if in_process else plan_device(perturbation, getattr(plan, "main_device", None)),
        threads=getattr(perturbation, "threads", None),
        cores=None if cores is None else tuple(cores),
        batch_size=plan.perturbation_batch_size,
        staleness=PLAN_MODES[mode],
        training_batch_size=getattr(plan, "batch_size", None),
        rho_rule=getattr(plan, "rho_rule", None) or NO_RHO_RULE,
        floor_fraction=_floor_fraction(plan),
        main_cores=getattr(plan, "main_cores", None),
        reserved_cores=getattr(plan, "reserved_cores", 0),
        nproc_per_node=getattr(plan, "nproc_per_node", None),
        ascent_dtype=getattr(plan, "ascent_dtype", None),
    )


def _floor_fraction(plan: Any) -> float | None:
    quality = getattr(plan, "quality", None)
    batch_size = getattr(plan, "batch_size", None)
    if quality is None or not batch_size:
        return None
    return quality.min_perturbation_batch_size / batch_size


def positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UserInputError(f"Invalid {name}: {value!r} (expected an integer >= 1)")
    return int(value)


def check_cores(cores: Any) -> tuple[int, ...] | None:
    if cores is None:
        return None
    if isinstance(cores, (str, bytes)) or not isinstance(cores, Iterable):
        raise UserInputError(f"Invalid cores: {cores!r} (expected a sequence of core ids)")
    cores = tuple(cores)
    if not cores or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0
                        for c in cores) or len(set(cores)) != len(cores):
        raise UserInputError(f"Invalid cores: {cores!r} (expected distinct integer core ids >= 0)")
    return tuple(int(c) for c in cores)


def check_rho(rho: Any) -> float:
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not math.isfinite(rho) or rho < 0:
        raise UserInputError(f"Invalid rho: {rho!r} (expected a finite number >= 0)")
    return float(rho)


def check_seconds(name: str, value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value <= 0):
        raise UserInputError(f"Invalid {name}: {value!r} (expected a finite number > 0)")
    return float(value)


def check_staleness(staleness: Any) -> int | str:
    if type(staleness) not in (int, str) or staleness not in STALENESS_VALUES:
        raise UserInputError(f"Invalid staleness: {staleness!r} (expected 0, 1 or 'non_blocking')")
    return staleness


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserInputError(f"Invalid {name}: {value!r} (expected True or False)")
    return value


def check_inputs(model: Any, base_optimizer: Any, loss_fn: Any, compute_loss: Any, on_worker_failure: Any,
                 clock: Any, seed: Any, perturber: Any) -> None:
    """The arguments of ``AsyncSAM`` that need no plan to be checked."""
    if not isinstance(model, torch.nn.Module):
        raise UserInputError(f"Invalid model: {model!r:.80} (expected a torch.nn.Module)")
    if not isinstance(base_optimizer, torch.optim.Optimizer):
        raise UserInputError(
            f"Invalid base_optimizer: {base_optimizer!r:.80} (expected a torch.optim.Optimizer "
            "instance, e.g. torch.optim.SGD(model.parameters(), lr=0.1))")
    if (loss_fn is None) == (compute_loss is None):
        raise UserInputError("pass exactly one of loss_fn (loss_fn(model(x), y) on (x, y) batches) and "
                             "compute_loss (compute_loss(model, batch) on any batch)")
    if loss_fn is not None and not callable(loss_fn):
        raise UserInputError(f"Invalid loss_fn: {loss_fn!r:.80} (expected a callable(output, target))")
    if compute_loss is not None and not callable(compute_loss):
        raise UserInputError(f"Invalid compute_loss: {compute_loss!r:.80} (expected a callable(model, batch))")
    if on_worker_failure not in FAILURE_POLICIES:
        raise UserInputError(f"Invalid on_worker_failure: {on_worker_failure!r} (expected 'fallback' or 'raise')")
    if not callable(clock):
        raise UserInputError(f"Invalid clock: {clock!r:.80} (expected a callable returning seconds)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise UserInputError(f"Invalid seed: {seed!r} (expected an integer)")
    if perturber is not None and not callable(perturber):
        raise UserInputError(f"Invalid perturber: {perturber!r:.80} (expected a factory f(AscentTask) -> Perturber)")


def one_batch(args: tuple, where: str) -> Any:
    """``f(batch)`` or ``f(x, y)``: the batch either way."""
    if len(args) == 1:
        return args[0]
    if len(args) == 2:
        return tuple(args)
    raise UserInputError(f"{where} takes one batch (or x, y), got {len(args)} arguments")


def check_pair(batch: Any) -> None:
    """An (inputs, targets) batch for loss_fn: one target per input row, checked before any worker sees it."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise UserInputError(f"loss_fn(output, target) needs (inputs, targets) batches, got a "
                             f"{type(batch).__name__}; pass compute_loss=fn(model, batch) for other batches")
    x, y = batch
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dim() and y.dim() \
            and x.shape[0] != y.shape[0]:
        raise UserInputError(f"Invalid batch: inputs {tuple(x.shape)} and targets {tuple(y.shape)} differ in rows "
                             f"({x.shape[0]} != {y.shape[0]})")


def rho_rule_from(value: Any, plan_rule: RhoRule | None) -> RhoRule:
    """The rule rho follows: the argument, else the plan's, else the project's default."""
    if value is None:
        return plan_rule if plan_rule is not None else DEFAULT_RHO_RULE
    if isinstance(value, RhoRule):
        return value
    if value == "none":
        return NO_RHO_RULE
    if value == "default":
        return DEFAULT_RHO_RULE
    raise UserInputError(f"Invalid rho_rule: {value!r:.60} (expected None, 'default', 'none' or a RhoRule)")


def adaptation_settings(adapt: Any, *, plan_given: bool, staleness: int | str, rho: float,
                        concurrent: bool) -> AdaptationSettings | None:
    """None when adaptation is off. Default: on for a plan at staleness 1 with a real worker."""
    if adapt is None:
        return AdaptationSettings() if plan_given and staleness == 1 and rho > 0 and concurrent else None
    if adapt is False:
        return None
    if adapt is not True and not isinstance(adapt, AdaptationSettings):
        raise UserInputError(f"Invalid adapt: {adapt!r:.80} (expected None, True, False or AdaptationSettings)")
    if staleness == 0:
        raise UserInputError(f"adapt={adapt!r:.60} needs staleness 1 or 'non_blocking', got staleness 0 "
                             "(synchronous SAM: no worker runs beside the main step)")
    if rho == 0:
        return None  # rho=0 is the base optimizer: no worker, nothing to size
    if not concurrent:
        raise UserInputError("adapt needs a worker running beside the main step (perturbation_device 'cpu' "
                             "or 'cuda:N', a plan, or a perturber), but the perturbation is computed in-process")
    settings = AdaptationSettings() if adapt is True else adapt
    if settings.cooldown < 1:
        # The job in flight when b_p changes still has the old size: its observation, one
        # step later, says nothing about the new one.
        raise UserInputError(f"Invalid adapt cooldown: {settings.cooldown!r} (AsyncSAM needs >= 1)")
    return settings


_RELATIVE_CUDA = re.compile(r"^cuda:([+-]\d+)$")
DEVICE_FORMS = ("None, 'cpu', 'cuda' (the model's own GPU), 'cuda:N', 'cuda:+K' (K GPUs after the model's) "
                "or {local_rank: device}")


def main_device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    first = next(iter(model.parameters()), None)
    return torch.device("cpu") if first is None else first.device


def local_rank_from_env(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank on its node as torchrun says (``LOCAL_RANK``); 0 without a launcher."""
    value = (os.environ if environ is None else environ).get("LOCAL_RANK", "0")
    try:
        rank = int(value)
    except ValueError:
        rank = -1
    if rank < 0:
        raise UserInputError(f"Invalid LOCAL_RANK in the environment: {value!r} (expected an integer >= 0)")
    return rank


def parse_device(value: Any, *, main_device: torch.device, local_rank: int | None = None,
                 cuda_count: int | None = None) -> torch.device | None:
    """The worker's device, read relative to the rank's own (the model's) device.

    ``"cuda"`` and ``"cuda:+0"`` are the model's own GPU (a second stream of it), ``"cuda:+K"``
    the K-th GPU after it: under torchrun every rank's worker lands beside its own model. A
    mapping ``{local_rank: device}`` names each rank's device explicitly. ``"cuda:N"`` is GPU N
    whatever the rank. ``cuda_count`` (tests: a number of fake GPUs) defaults to what torch sees.
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        rank = local_rank_from_env() if local_rank is None else local_rank
        if rank not in value:
            raise UserInputError(f"Invalid perturbation_device: {dict(value)!r:.120} has no entry for local rank "
                                 f"{rank}")
        if isinstance(value[rank], Mapping):
            raise UserInputError(f"Invalid perturbation_device: the entry for local rank {rank} is a mapping")
        return parse_device(value[rank], main_device=main_device, local_rank=rank, cuda_count=cuda_count)
    relative = _RELATIVE_CUDA.match(value) if isinstance(value, str) else None
    if relative is not None or value == "cuda":
        offset = int(relative.group(1)) if relative is not None else 0
        if main_device.type != "cuda":
            raise UserInputError(f"perturbation_device {value!r} is relative to the model's GPU, but the model is "
                                 f"on {main_device}")
        index = (main_device.index or 0) + offset
        return _checked_cuda(value, index, cuda_count, f" (the model is on {main_device})")
    if isinstance(value, torch.device):
        device = value
    elif isinstance(value, str):
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            raise UserInputError(f"Invalid perturbation_device: {value!r} (expected {DEVICE_FORMS})") from None
    else:
        raise UserInputError(f"Invalid perturbation_device: {value!r:.80} (expected {DEVICE_FORMS})")
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if device.index is None:  # torch.device("cuda"): the model's own GPU, as the string says
            return parse_device("cuda", main_device=main_device, local_rank=local_rank, cuda_count=cuda_count)
        return _checked_cuda(value, device.index, cuda_count, "")
    raise UserInputError(f"Unsupported perturbation_device: {value!r} (expected {DEVICE_FORMS})")


def check_device_form(value: Any) -> None:
    """The form of a ``perturbation_device`` alone, before any model is known (the trainer
    callbacks check their options when built); ``parse_device`` reads it against the model's."""
    if value is None or isinstance(value, torch.device) and value.type in ("cpu", "cuda"):
        return
    if isinstance(value, Mapping):
        for device in value.values():
            check_device_form(device)
        return
    if isinstance(value, str) and (value == "cuda" or _RELATIVE_CUDA.match(value)):
        return
    try:
        device = torch.device(value) if isinstance(value, str) else None
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserInputError(f"Invalid perturbation_device: {value!r:.80} (expected {DEVICE_FORMS})")


def _checked_cuda(value: Any, index: int, cuda_count: int | None, where: str) -> torch.device:
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if count == 0:
        raise UserInputError(f"perturbation_device {value!r} needs CUDA, which is not available here")
    if not 0 <= index < count:
        raise UserInputError(f"perturbation_device {value!r} is cuda:{index}{where}, but only {count} CUDA devices "
                             "are visible")
    return torch.device("cuda", index)


def plan_device(perturbation: Any, main_device: str | None) -> str | None:
    """A plan's perturbation device, relative to its main device: what a rank's worker uses.

    A plan made on one GPU says "cuda:0" for its main device and "cuda:0" with
    ``secondary_stream`` (a second stream of it) or "cuda:1" (another GPU). Read as "the
    model's own GPU" and "one GPU after the model's", each rank's worker lands beside its own
    model under torchrun.
    """
    device = perturbation.device
    if device is None or not str(device).startswith("cuda"):
        return device
    if getattr(perturbation, "secondary_stream", False):
        return "cuda:+0"
    main = (main_device or "").split("/")[0]
    if main.startswith("cuda:") and device.startswith("cuda:"):
        offset = int(device.removeprefix("cuda:")) - int(main.removeprefix("cuda:"))
        return f"cuda:{offset:+d}"
    return device


def worker_placement(settings: PlanSettings, perturbation_device: Any, threads: Any, cores: Any,
                     perturber: Any, *, main_device: torch.device | None = None,
                     cuda_count: int | None = None) -> tuple[torch.device | None, int | None, tuple[int, ...] | None]:
    """The worker's device (relative to ``main_device``, the model's), threads and cores: the
    arguments, else the plan's."""
    device = parse_device(perturbation_device if perturbation_device is not None else settings.device,
                          main_device=torch.device("cpu") if main_device is None else main_device,
                          cuda_count=cuda_count)
    threads, cores = positive_int("threads", threads), check_cores(cores)
    if (threads is not None or cores is not None) and (device is None or device.type != "cpu"):
        raise UserInputError(f"threads={threads!r} and cores={cores!r} apply to a CPU worker only, "
                             f"but perturbation_device is {device!r}")
    if perturber is not None and (perturbation_device is not None or threads is not None or cores is not None):
        raise UserInputError(f"perturber={perturber!r:.60} replaces the worker: "
                             "do not also pass perturbation_device, threads or cores")
    if device is not None and device.type == "cpu" and settings.device == "cpu":
        # The plan's threads and cores belong to its CPU worker only.
        threads = threads if threads is not None else settings.threads
        cores = cores if cores is not None else settings.cores
    return device, threads, cores
