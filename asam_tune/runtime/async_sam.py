"""``AsyncSAM``: asynchronous Sharpness-Aware Minimization around any ``torch.optim`` optimizer.

Loop helper (owns the one-batch look-ahead)::

    with AsyncSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, rho=0.05,
                  plan="plan.json") as sam:
        for x, y in sam.lookahead(loader):
            loss = sam.step(x, y)          # a detached 0-dim tensor (.item() syncs the device)

Explicit pieces for custom loops (AMP, gradient accumulation, DDP, trainers); ``step()`` is
exactly this::

    with sam.perturbed(x, y, next_batch=(x_next, y_next)):   # w_t + e_t; worker gets S_{t+1}
        scaler.scale(loss_fn(model(x), y)).backward()         # ONE backward, one unscale_
    scaler.step(sam.base_optimizer); scaler.update()          # or sam.base_optimizer.step()
    sam.base_optimizer.zero_grad()
    sam.finish_step()

Step t (staleness 1, DESIGN.md): the first ``perturbed()`` of the step takes ``e_t`` (the
worker's result for step t, waiting only if it is late; at the first step, or whenever none was
prepared, it is computed now from ``w_t`` on the first ``b_p`` samples of the batch given),
then hands the worker ``w_t`` and the first ``b_p`` samples of ``next_batch``, then adds
``e_t`` to the weights; leaving the block restores ``w_t`` by copy (bit-identical), also on an
exception. Further ``perturbed()`` blocks in the same step (gradient accumulation) reuse
``e_t``. ``staleness=0`` computes ``e_t`` from ``w_t`` on the current batch at the first
``perturbed()`` (synchronous SAM, same path; ``next_batch`` is ignored). ``"non_blocking"``
never waits once running: it hands a job only when the worker is idle and applies the newest
perturbation it has, recording the staleness it used.

Edges: the last batch a ``lookahead()`` yields has no successor, so nothing is handed to the
worker during that step and the first step of the next ``lookahead()`` (next epoch) computes
its perturbation synchronously, as step 0 does. A non-finite perturbation is skipped (that
step descends unperturbed) and counted. ``rho=0`` starts no worker and is the base optimizer.

Several ranks (torchrun, DDP; ``runtime/distributed.py``): one worker per rank, on the rank's
own look-ahead samples and a replica of DDP's inner module (no collective); building AsyncSAM
is collective (the node's cores are divided among its ranks' workers unless ``cores`` is
given), and so is the first ``perturbed()`` of each step while a worker runs: one int
all_reduce by which all ranks learn of any rank's worker failure and all switch to synchronous
SAM (or all raise) in that same step.

Online adaptation (``adapt``, runtime/adaptation.py): a ``BatchSizeAdapter`` is fed, after
every step whose perturbation came from the worker, the step's time, how long the main process
was blocked collecting the result and how long the result had been waiting for it; it answers
the ``b_p`` for the next job (the job in flight keeps its size). Steps whose perturbation was
computed on the spot (step 0, the first step of a ``lookahead()``, after a fallback) are not
fed. In non-blocking mode nothing blocks: a result that was not there when its step began
counts as the wait a staleness-1 step would have had (its estimated finish minus that step's
start). On by default when a plan with mode "staleness1" is given; per rank under DDP (b_p
changes no collective).

Checkpoints: ``{"model": model.state_dict(), "sam": sam.state_dict()}`` between steps
(after ``finish_step()``). ``model.state_dict()`` inside ``perturbed()`` still returns the
clean weights (a state-dict hook substitutes them); ``sam.state_dict()`` and
``load_state_dict()`` refuse to run inside ``perturbed()`` or after the optimizer step of an
unfinished step. RNG state (dropout, data order) stays the caller's to save.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from asam_tune.errors import FingerprintMismatchError, UserInputError, WorkerError
from asam_tune.runtime.adaptation import AdaptationSettings, BatchSizeAdapter
from asam_tune.runtime.perturbation import trainable_parameters
from asam_tune.runtime.perturber import InProcessPerturber, PerturbationResult, Perturber
from asam_tune.runtime.stats import AsyncSAMStats, StatsRecorder

__all__ = ["AsyncSAM"]

_STATE_FORMAT = 1
_STALENESS_VALUES = (0, 1, "non_blocking")
# Plan.mode -> staleness
_PLAN_MODES = {"synchronous": 0, "staleness1": 1, "non_blocking": "non_blocking"}
_FAILURE_POLICIES = ("fallback", "raise")


# ----------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class _Settings:
    """What the runtime takes from a plan; every field may be overridden by an argument."""

    device: str | None = None
    threads: int | None = None
    cores: tuple[int, ...] | None = None
    batch_size: int | None = None
    staleness: int | str | None = None
    training_batch_size: int | None = None  # B: the largest b_p adaptation may grow to
    # Per rank, for dividing a node's cores among torchrun's ranks (runtime/distributed.py).
    main_cores: int | None = None
    reserved_cores: int = 0
    nproc_per_node: int | None = None


def _load_plan(plan: Any, allow_other_machine: bool) -> Any:
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


def _settings_from_plan(plan: Any) -> _Settings:
    """The only place that reads ``Plan`` attributes (asam_tune/records/plan.py).

    A "synchronous" plan means the perturbation device cannot beat SAM in-process, so the
    worker is the in-process one whatever device the plan names. Whether a CUDA worker uses a
    second stream follows from its device being the main one (the plan's
    ``secondary_stream`` says the same).
    """
    perturbation = plan.perturbation
    mode = plan.mode
    if mode not in _PLAN_MODES:
        raise UserInputError(f"plan mode must be one of {sorted(_PLAN_MODES)}, got {mode!r}")
    cores = getattr(perturbation, "cores", None)
    in_process = mode == "synchronous" or perturbation.device is None
    return _Settings(
        device=None if in_process else str(perturbation.device),
        threads=getattr(perturbation, "threads", None),
        cores=None if cores is None else tuple(cores),
        batch_size=plan.perturbation_batch_size,
        staleness=_PLAN_MODES[mode],
        training_batch_size=getattr(plan, "batch_size", None),
        main_cores=getattr(plan, "main_cores", None),
        reserved_cores=getattr(plan, "reserved_cores", 0),
        nproc_per_node=getattr(plan, "nproc_per_node", None),
    )


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UserInputError(f"Invalid {name}: {value!r} (expected an integer >= 1)")
    return int(value)


def _check_cores(cores: Any) -> tuple[int, ...] | None:
    if cores is None:
        return None
    if isinstance(cores, (str, bytes)) or not isinstance(cores, Iterable):
        raise UserInputError(f"Invalid cores: {cores!r} (expected a sequence of core ids)")
    cores = tuple(cores)
    if not cores or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0
                        for c in cores) or len(set(cores)) != len(cores):
        raise UserInputError(f"Invalid cores: {cores!r} (expected distinct integer core ids >= 0)")
    return tuple(int(c) for c in cores)


def _check_rho(rho: Any) -> float:
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not math.isfinite(rho) or rho < 0:
        raise UserInputError(f"Invalid rho: {rho!r} (expected a finite number >= 0)")
    return float(rho)


def _check_timeout(timeout: Any) -> float:
    if (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
            or not math.isfinite(timeout) or timeout <= 0):
        raise UserInputError(f"Invalid worker_timeout_s: {timeout!r} (expected a finite number > 0)")
    return float(timeout)


def _check_staleness(staleness: Any) -> int | str:
    if type(staleness) not in (int, str) or staleness not in _STALENESS_VALUES:
        raise UserInputError(f"Invalid staleness: {staleness!r} (expected 0, 1 or 'non_blocking')")
    return staleness


def _adaptation_settings(adapt: Any, *, plan_given: bool, staleness: int | str, rho: float,
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


def _parse_device(value: Any) -> torch.device | None:
    if value is None:
        return None
    if isinstance(value, torch.device):
        device = value
    elif isinstance(value, str):
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            raise UserInputError(f"Invalid perturbation_device: {value!r}") from None
    else:
        raise UserInputError(f"Invalid perturbation_device: {value!r} (expected None, 'cpu' or 'cuda:N')")
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"perturbation_device {value!r} needs CUDA, which is not available here")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UserInputError(
                f"perturbation_device {value!r}: only {torch.cuda.device_count()} CUDA devices visible")
        return torch.device("cuda", index)
    raise UserInputError(f"Unsupported perturbation_device: {value!r} (expected None, 'cpu' or 'cuda:N')")


def _worker_placement(settings: _Settings, perturbation_device: Any, threads: Any, cores: Any,
                      perturber: Any) -> tuple[torch.device | None, int | None, tuple[int, ...] | None]:
    """The worker's device, threads and cores: the arguments, else the plan's."""
    device = _parse_device(perturbation_device if perturbation_device is not None else settings.device)
    threads, cores = _positive_int("threads", threads), _check_cores(cores)
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


def _as_pair(batch: Any, where: str) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise UserInputError(f"{where} needs (inputs, targets) batches, got {type(batch).__name__}: {batch!r:.80}")
    return batch[0], batch[1]


def _replicated_module(model: nn.Module) -> nn.Module:
    """What a worker copies: DDP's inner module (a replica must never join DDP's collectives)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _close_quietly(perturber: Perturber) -> None:
    try:
        perturber.close()
    except Exception:  # a dead worker may fail to close; there is nothing left to free
        pass


class _CleanStateDictHook:
    """Makes ``model.state_dict()`` inside ``perturbed()`` hold the clean weights ``w_t``.

    Pickles and deep-copies as an inert hook, so ``torch.save(model)`` and replicas still work.
    """

    def __init__(self, sam: AsyncSAM | None):
        self._sam = None if sam is None else weakref.ref(sam)

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        sam = None if self._sam is None else self._sam()
        if sam is None or sam._clean is None or module is not sam.model:
            return
        clean_by_id = {id(p): c for p, c in zip(sam._params, sam._clean)}
        for name, param in module.named_parameters(remove_duplicate=False):
            clean = clean_by_id.get(id(param))
            if clean is not None and prefix + name in state_dict:
                state_dict[prefix + name] = clean.detach().clone()  # the buffer is reused next step

    def __reduce__(self):
        return (_CleanStateDictHook, (None,))

    def __deepcopy__(self, memo: dict) -> _CleanStateDictHook:
        return _CleanStateDictHook(None)


# ----------------------------------------------------------------------------- AsyncSAM

class AsyncSAM:
    """SAM whose ascent perturbation runs on a second device, one step behind the weights.

    ``perturbation_device``: None (in-process on the main device, synchronous), ``"cpu"`` (a
    worker process) or ``"cuda:N"`` (another GPU, or a second stream of the main GPU). Explicit
    arguments override ``plan`` (a Plan or its path). ``perturbation_batch_size`` None means
    the whole batch. ``staleness``: 1, 0 or ``"non_blocking"`` (default: the plan's mode,
    else 1).
    ``on_worker_failure``: ``"fallback"`` warns once and continues with synchronous SAM;
    ``"raise"`` re-raises the ``WorkerError``. ``perturber`` replaces the worker with any
    object implementing the ``Perturber`` protocol (AsyncSAM closes it).
    ``adapt``: resize ``b_p`` online (True, False, or ``AdaptationSettings``); None (default)
    turns it on when ``plan`` is given and the mode is staleness 1. It grows ``b_p`` up to the
    plan's batch size, else the first batch's. ``clock``: the timer adaptation reads (seconds).
    Under torch.distributed with several ranks, ``placement`` holds the cores and threads this
    rank got and ``failure_agreement`` the per-step agreement (docs/cluster.md).
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        rho: float = 0.05,
        *,
        plan: Any = None,
        perturbation_device: str | torch.device | None = None,
        perturbation_batch_size: int | None = None,
        threads: int | None = None,
        cores: Sequence[int] | None = None,
        staleness: int | str | None = None,
        on_worker_failure: str = "fallback",
        worker_timeout_s: float = 60.0,
        allow_other_machine: bool = False,
        perturber: Perturber | None = None,
        adapt: bool | AdaptationSettings | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if not isinstance(model, nn.Module):
            raise UserInputError(f"Invalid model: {model!r:.80} (expected a torch.nn.Module)")
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise UserInputError(
                f"Invalid base_optimizer: {base_optimizer!r:.80} (expected a torch.optim.Optimizer "
                "instance, e.g. torch.optim.SGD(model.parameters(), lr=0.1))")
        if not callable(loss_fn):
            raise UserInputError(f"Invalid loss_fn: {loss_fn!r:.80} (expected a callable(output, target))")
        if on_worker_failure not in _FAILURE_POLICIES:
            raise UserInputError(f"Invalid on_worker_failure: {on_worker_failure!r} (expected 'fallback' or 'raise')")
        if not isinstance(allow_other_machine, bool):
            raise UserInputError(f"Invalid allow_other_machine: {allow_other_machine!r} (expected True or False)")
        if not callable(clock):
            raise UserInputError(f"Invalid clock: {clock!r:.80} (expected a callable returning seconds)")
        params = trainable_parameters(model)
        if not params:
            raise UserInputError(f"model {type(model).__name__} has no trainable parameters to perturb")

        settings = _settings_from_plan(_load_plan(plan, allow_other_machine)) if plan is not None else _Settings()
        cores_given = cores is not None
        device, threads, cores = _worker_placement(settings, perturbation_device, threads, cores, perturber)
        if device is not None and device.type == "cuda" and params[0].device.type != "cuda":
            raise UserInputError(f"perturbation_device {str(device)!r} needs the model on a CUDA device, "
                                 f"but it is on {params[0].device}")

        self.model = model
        self.base_optimizer = base_optimizer
        self.loss_fn = loss_fn
        self.rho = _check_rho(rho)
        self.perturbation_batch_size = _positive_int(
            "perturbation_batch_size",
            perturbation_batch_size if perturbation_batch_size is not None else settings.batch_size)
        configured = staleness if staleness is not None else settings.staleness
        self._configured_staleness = _check_staleness(1 if configured is None else configured)
        self.staleness = self._configured_staleness  # becomes 0 after a worker fallback
        self._on_failure = on_worker_failure
        self._timeout = _check_timeout(worker_timeout_s)
        self._params = params
        self._clock = clock

        # Online b_p adaptation. The adapter starts at the first job: without a plan its bound
        # is the first batch's size.
        self._adapt_settings = _adaptation_settings(
            adapt, plan_given=plan is not None, staleness=self.staleness, rho=self.rho,
            concurrent=device is not None or perturber is not None)
        self._adapt_bound = settings.training_batch_size
        self._adapter: BatchSizeAdapter | None = None
        self._submitted_at = 0.0  # when the last job was handed over (clock)
        self._inflight_ahead = False  # the job in flight serves a later step (not _compute_now's)
        self._needed_at: float | None = None  # non-blocking: its step began without its result
        self._observed: tuple[float, float, float] | None = None  # (waited, idle, missed) this step
        self._last_finish: float | None = None  # clock at the last finish_step()

        self._stats = StatsRecorder()
        self._step = 0  # finished steps; the weights are w_step
        self._held: dict[int, PerturbationResult] = {}  # collected results by the step they serve
        self._inflight: int | None = None  # the step the worker's current job serves
        self._current: PerturbationResult | None = None  # e_t, chosen at the step's first perturbed()
        # The last collected result: its tensors may be the worker's reusable output buffers
        # (ProcessPerturber's are valid until the next collect), so it is copied before the next
        # collect if it is still needed then. In steady state it never is: no copy per step.
        self._borrowed: PerturbationResult | None = None
        self._step_started = False
        self._prefetched: tuple[int, int] | None = None  # ids of the batch handed over this step
        self._optimizer_stepped = False
        self._clean: list[torch.Tensor] | None = None  # w_t while perturbed
        self._clean_buffers: list[torch.Tensor] | None = None  # storage behind _clean
        self._peeked: tuple[int, tuple[Any, Any] | None] | None = None
        self._closed = False

        # Several ranks (torchrun, DDP): divide the node's cores among the ranks' workers and
        # agree on worker failures in lockstep (runtime/distributed.py). Collective when built.
        group = None
        if self.rho > 0:
            from asam_tune.runtime.distributed import process_group_of

            group = process_group_of(model)
        self.placement: Any = None  # RankPlacement: this rank's cores and threads, when chosen here
        if group is not None and perturber is None and device is not None and device.type == "cpu" \
                and not cores_given:
            from asam_tune.runtime.distributed import place_rank

            self.placement = place_rank(
                group, worker_threads=threads or 1, main_cores=settings.main_cores,
                reserved_cores=settings.reserved_cores, expected_local_world_size=settings.nproc_per_node,
                main_device=params[0].device)
            threads, cores = self.placement.worker_threads, self.placement.cores.worker
        self._agreement = None  # FailureAgreement while a worker that can fail runs
        self._agreeing = False
        self._local_failure: WorkerError | None = None  # seen here, not yet agreed by all ranks

        self._perturber: Perturber | None = None
        self._finalizer: weakref.finalize | None = None
        if perturber is not None:
            self._adopt(perturber)
        elif self.rho > 0:  # rho=0 is the base optimizer: no worker at all
            self._adopt(self._start_worker(device, threads, cores))
        if group is not None and self._perturber is not None \
                and not isinstance(self._perturber, InProcessPerturber):
            from asam_tune.runtime.distributed import FailureAgreement

            self._agreement = FailureAgreement(group, params[0].device)
            self._agreeing = True

        # Weak references: the optimizer and the model must not keep this object alive.
        me = weakref.ref(self)

        def before_optimizer_step(*_: Any) -> None:
            sam = me()
            if sam is not None and sam._clean is not None:
                raise UserInputError("the base optimizer stepped inside perturbed(): step it after the "
                                     "block, when the weights are w_t again")

        def after_optimizer_step(*_: Any) -> None:
            sam = me()
            if sam is not None:
                sam._optimizer_stepped = True

        self._hooks = [
            base_optimizer.register_step_pre_hook(before_optimizer_step),
            base_optimizer.register_step_post_hook(after_optimizer_step),
            model.register_state_dict_post_hook(_CleanStateDictHook(self)),
        ]

    def _start_worker(self, device: torch.device | None, threads: int | None,
                      cores: tuple[int, ...] | None) -> Perturber:
        source = _replicated_module(self.model)
        if device is None:
            return InProcessPerturber(source, self.loss_fn, self.rho)
        if device.type == "cpu":
            from asam_tune.runtime.process_worker import ProcessPerturber

            options: dict[str, Any] = {"timeout_s": self._timeout}
            if threads is not None:
                options["threads"] = threads
            if cores is not None:
                options["cores"] = cores
            return ProcessPerturber(source, self.loss_fn, self.rho, **options)
        from asam_tune.runtime.stream_worker import StreamPerturber

        main = self._params[0].device
        return StreamPerturber(source, self.loss_fn, self.rho, device=device,
                               secondary_stream=(device == main))

    def _adopt(self, perturber: Perturber) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._perturber = perturber
        # Closes the worker if this AsyncSAM is dropped without close(): no orphan processes.
        self._finalizer = weakref.finalize(self, _close_quietly, perturber)

    # ------------------------------------------------------------------ public surface

    @property
    def param_groups(self) -> list[dict]:
        """The base optimizer's param groups (the same list: schedulers see one state)."""
        return self.base_optimizer.param_groups

    @property
    def step_count(self) -> int:
        """Steps finished so far; the weights are ``w_{step_count}``."""
        return self._step

    @property
    def failure_agreement(self) -> Any:
        """The per-step agreement on worker failures under torch.distributed (its ``calls`` and
        ``seconds`` say what it cost), or None with one rank or no worker process."""
        return self._agreement

    @property
    def worker_pid(self) -> int | None:
        """The worker process's pid (None for in-process and stream workers)."""
        return getattr(self._perturber, "pid", None)

    def __enter__(self) -> AsyncSAM:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker and drop the hooks; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._local_failure is not None:  # failed in the last step: no later step to agree in
            warnings.warn(f"asam-tune: perturbation worker failed after the last agreed step: {self._local_failure}",
                          RuntimeWarning, stacklevel=2)
            self._local_failure = None
        for handle in self._hooks:
            handle.remove()
        self._held.clear()
        self._inflight = None
        if self._finalizer is not None:
            self._finalizer()  # closes the perturber once
        self._perturber = None

    def lookahead(self, loader: Iterable) -> Iterator[Any]:
        """Yield the loader's batches, peeking one ahead so ``step()`` can hand it to the worker.

        The last batch has no successor: its step hands the worker nothing.
        """
        iterator = iter(loader)
        end = object()
        current = next(iterator, end)
        while current is not end:
            following = next(iterator, end)
            peek = None if following is end else _as_pair(following, "lookahead()")
            self._peeked = (self._step, peek)
            try:
                yield current
            finally:
                self._peeked = None
            current = following

    def step(self, x: Any, y: Any) -> torch.Tensor:
        """One SAM step on batch (x, y); returns the loss at ``w_t + e_t``, detached."""
        peeked, self._peeked = self._peeked, None
        next_batch = peeked[1] if peeked is not None and peeked[0] == self._step else None
        self.base_optimizer.zero_grad(set_to_none=True)
        with self.perturbed(x, y, next_batch=next_batch):
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
        self.base_optimizer.step()
        self.base_optimizer.zero_grad(set_to_none=True)
        self.finish_step()
        return loss.detach()

    @contextlib.contextmanager
    def perturbed(self, x: Any, y: Any, *, next_batch: tuple[Any, Any] | None = None) -> Iterator[None]:
        """Weights ``w_t + e_t`` inside the block, ``w_t`` (bit-identical) after it.

        ``(x, y)`` is the batch (or first micro-batch) the descent uses: ``e_t`` is computed
        from its first ``b_p`` samples when it was not prepared. ``next_batch`` is handed to
        the worker, as ``prefetch()`` does.
        """
        self._check_usable("perturbed()")
        if self._clean is not None:
            raise UserInputError("perturbed() blocks cannot be nested")
        if not self._step_started:
            self._mark_step_start()
            self._current = self._choose_perturbation(x, y)
            self._step_started = True
            self._record_choice(self._current)
        if next_batch is not None:
            self.prefetch(*_as_pair(next_batch, "perturbed(next_batch=...)"))
        perturbation = None if self._current is None else self._current.perturbation
        if perturbation is None:  # rho=0, or a non-finite perturbation: descend at w_t
            yield
            return
        with torch.no_grad():
            self._clean = self._keep_clean_weights()
            try:
                if all(e.device == p.device and e.dtype == p.dtype for p, e in zip(self._params, perturbation)):
                    torch._foreach_add_(self._params, perturbation)  # one fused call, not one per tensor
                else:
                    for p, e in zip(self._params, perturbation):
                        p.add_(e.to(device=p.device, dtype=p.dtype))
            except BaseException:
                self._restore()
                raise
        try:
            yield
        finally:
            self._restore()

    def prefetch(self, x_next: Any, y_next: Any) -> None:
        """Hand the worker ``w_t`` and the first ``b_p`` samples of the next step's batch.

        Call once per step, outside ``perturbed()`` and before the optimizer step. A no-op at
        staleness 0 (its ascent batch is the current one) and with rho=0. In non-blocking
        mode the batch is passed over when the worker is still busy.
        """
        self._check_usable("prefetch()")
        if self._clean is not None:
            raise UserInputError("prefetch() inside perturbed() would hand the worker perturbed weights: "
                                 "pass next_batch= to perturbed() or call prefetch() before it")
        if self._perturber is None or self.rho == 0 or self.staleness == 0:
            return
        self._mark_step_start()
        if self._prefetched is not None:
            if self._prefetched == (id(x_next), id(y_next)):
                return  # the same batch again: a step retried after an exception
            raise UserInputError(f"prefetch() called twice in step {self._step} with different batches")
        self._prefetched = (id(x_next), id(y_next))
        if self.staleness == "non_blocking":
            self._poll()
            if self._inflight is not None:
                return
        elif self._inflight is not None:
            self._collect()  # one job at a time: this is normally e_t itself
        # A fallback during the collect makes SAM synchronous; a failure that the ranks have
        # not agreed on yet makes the next step synchronous on every rank.
        if self.staleness != 0 and self._local_failure is None:
            self._submit(self._step + 1, x_next, y_next)

    def finish_step(self) -> None:
        """Close step t after the optimizer step: the weights are now ``w_{t+1}``."""
        self._check_usable("finish_step()")
        if self._clean is not None:
            raise UserInputError("finish_step() inside perturbed(): leave the block first")
        self._stats.end_step()
        if self._adapt_settings is not None:
            self._feed_adapter()
        self._step += 1
        self._step_started = self._optimizer_stepped = False
        self._prefetched = None
        self._current = None
        self._prune_held()

    def stats(self) -> AsyncSAMStats:
        trajectory = () if self._adapter is None else tuple(self._adapter.trajectory)
        return self._stats.snapshot(self.perturbation_batch_size, trajectory)

    def state_dict(self) -> dict[str, Any]:
        """Base optimizer state, step counter, pending perturbations, rho, mode, stats, adapter.

        Waits for a job in flight (except in non-blocking mode) so that the pending ``e_t``
        is saved. Loads with ``torch.load(..., weights_only=True)``.
        """
        self._check_between_steps("state_dict()")
        if self._inflight is not None and self.staleness != "non_blocking":
            self._collect()
            # Collected between steps, around a checkpoint: its timing describes no step, and a
            # run resumed from this checkpoint never sees it. Dropped, so resuming equals going on.
            self._observed = None
        pending = [
            {"serves_step": target, "weights_step": result.step,
             "perturbation": None if result.perturbation is None else [t.clone() for t in result.perturbation],
             "compute_time_s": float(result.compute_time_s)}
            for target, result in sorted(self._held.items())  # pruned: all still usable
        ]
        return {
            "format": _STATE_FORMAT,
            "base_optimizer": self.base_optimizer.state_dict(),
            "step": self._step,
            "rho": self.rho,
            "staleness": self._configured_staleness,
            "perturbation_batch_size": self.perturbation_batch_size,
            "pending": pending,
            "stats": self._stats.state_dict(),
            "adapter": None if self._adapter is None else self._adapter.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; rho must match. Load the model's weights too.

        With adaptation on, the checkpoint's adapter (and its ``b_p``) comes back; with it off,
        this object's ``b_p`` stays.
        """
        self._check_between_steps("load_state_dict()")
        if self._step_started or self._prefetched is not None:
            raise UserInputError("load_state_dict() in the middle of a step: call it between steps")
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise UserInputError(f"not an AsyncSAM state (format {_STATE_FORMAT} expected), got format {found!r}")
        if state.get("rho") != self.rho:
            raise UserInputError(f"checkpoint rho {state.get('rho')!r} != this AsyncSAM's rho {self.rho!r}")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise UserInputError(f"Invalid step in AsyncSAM state: {step!r}")
        try:
            held = {int(entry["serves_step"]): self._result_from_state(entry) for entry in state["pending"]}
            optimizer_state, stats_state = state["base_optimizer"], state["stats"]
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(f"incomplete AsyncSAM state: {exc!r}") from None
        adapter = None
        if self._adapt_settings is not None and state.get("adapter") is not None:  # older states lack it
            adapter = BatchSizeAdapter(1, 1)
            adapter.load_state_dict(state["adapter"])
        if self._inflight is not None:  # a job for the state being replaced
            self._collect()
        self.base_optimizer.load_state_dict(optimizer_state)
        self._stats.load_state_dict(stats_state)
        self._step = step
        self._held = held if self._perturber is not None else {}
        if adapter is not None:
            self._adapter, self.perturbation_batch_size = adapter, adapter.batch_size
        # The next step's time runs from its own start, and no result collected so far is fed.
        self._observed = self._needed_at = self._last_finish = None

    # ------------------------------------------------------------------ internals

    def _check_usable(self, what: str) -> None:
        if self._closed:
            raise UserInputError(f"{what} on a closed AsyncSAM")
        if self._optimizer_stepped and what != "finish_step()":
            raise UserInputError(f"{what} after the base optimizer stepped: call sam.finish_step() "
                                 "after every optimizer step")

    def _check_between_steps(self, what: str) -> None:
        if self._clean is not None:
            raise UserInputError(f"{what} inside perturbed(): checkpoint between steps")
        if self._optimizer_stepped:
            raise UserInputError(f"{what} after the optimizer step of an unfinished step: call finish_step() first")

    def _keep_clean_weights(self) -> list[torch.Tensor]:
        """A copy of w_t in buffers allocated once: no allocation on the training step's path."""
        if self._clean_buffers is None:
            self._clean_buffers = [torch.empty_like(p) for p in self._params]
        torch._foreach_copy_(self._clean_buffers, [p.detach() for p in self._params])
        return self._clean_buffers

    def _restore(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self._params, self._clean)  # by copy: bit-identical
        self._clean = None

    def _record_choice(self, result: PerturbationResult | None) -> None:
        if result is None:
            return
        if result.perturbation is None:
            self._stats.skipped += 1
        else:
            self._stats.add_applied(self._step - result.step)

    def _lookup(self, step: int) -> PerturbationResult | None:
        if self.staleness != "non_blocking":
            return self._held.get(step)
        usable = [target for target in self._held if target <= step]
        return self._held[max(usable)] if usable else None

    def _prune_held(self) -> None:
        if self.staleness == "non_blocking":
            usable = [target for target in self._held if target <= self._step]
            floor = max(usable) if usable else self._step
        else:
            floor = self._step
        for target in [t for t in self._held if t < floor]:
            del self._held[target]

    def _choose_perturbation(self, x: Any, y: Any) -> PerturbationResult | None:
        if self._perturber is None or self.rho == 0:
            return None
        if self.staleness == "non_blocking":
            self._poll()
            if (self._adapter is not None and self._inflight is not None and self._inflight <= self._step
                    and self._needed_at is None):
                self._needed_at = self._clock()  # this step goes on without the job's result
        elif self._inflight == self._step and self._step not in self._held:
            self._collect()
        if self._agreeing:
            # The fixed point of the step where every rank learns of every worker failure.
            self._agree()
        result = self._lookup(self._step)
        return result if result is not None else self._compute_now(x, y)

    def _compute_now(self, x: Any, y: Any) -> PerturbationResult:
        """e_t from w_t on the first b_p samples of (x, y), waiting for it."""
        # Two tries: a worker that fails is replaced by the in-process one, which cannot.
        for _ in range(2):
            if self._inflight is not None:
                self._collect()  # one job at a time
            if self._submit(self._step, x, y):
                self._collect()
            if self._step in self._held:
                return self._held[self._step]
        raise RuntimeError("the perturbation could not be computed, even in-process")

    def _submit(self, serves_step: int, x: Any, y: Any) -> bool:
        if self._adapt_settings is not None and self._adapter is None:
            self._start_adapter(len(x))
        b = self.perturbation_batch_size
        xs, ys = (x, y) if b is None else (x[:b], y[:b])
        weights = [p.detach() for p in self._params]
        started = self._clock()
        try:
            self._perturber.submit(self._step, weights, xs, ys)
        except WorkerError as exc:
            self._fall_back(exc)
            return False
        finally:
            self._submitted_at = self._clock()
            self._stats.add_wait(self._submitted_at - started)
        self._inflight = serves_step
        self._inflight_ahead = serves_step > self._step
        self._needed_at = None
        return True

    def _collect(self, ready: bool | None = None) -> None:
        """Wait for the job in flight and hold its result. ``ready``: known to be done."""
        self._own_borrowed()
        serves_step, self._inflight = self._inflight, None
        timed = self._adapter is not None and self._inflight_ahead
        if timed and ready is None:
            # A collect that does not block only copies the result out: that copy is not a wait.
            try:
                ready = self._perturber.ready()
            except WorkerError:
                ready = False  # collect() raises it again
        started = self._clock()
        try:
            result = self._perturber.collect(self._timeout)
        except WorkerError as exc:
            self._fall_back(exc)
            return
        finally:
            ended = self._clock()
            self._stats.add_wait(ended - started)
        if result.perturbation is not None and len(result.perturbation) != len(self._params):
            raise RuntimeError(f"worker returned {len(result.perturbation)} tensors for "
                               f"{len(self._params)} trainable parameters")
        self._stats.add_compute(result.compute_time_s)
        self._held[serves_step] = result
        self._borrowed = result if result.perturbation is not None else None
        if timed:
            self._note_timing(serves_step, result.compute_time_s, bool(ready), started, ended)

    # ------------------------------------------------------------------ online adaptation

    def _start_adapter(self, first_batch_size: int) -> None:
        bound = self._adapt_bound or first_batch_size
        initial = min(self.perturbation_batch_size or bound, bound)
        self._adapter = BatchSizeAdapter(initial, bound, self._adapt_settings)
        self.perturbation_batch_size = initial

    def _mark_step_start(self) -> None:
        # The first step after construction or a resume has no previous finish: it is timed from here.
        if self._adapt_settings is not None and self._last_finish is None:
            self._last_finish = self._clock()

    def _note_timing(self, serves_step: int, compute_s: float, ready: bool, started: float,
                     ended: float) -> None:
        """This step's view of the worker: (blocked, idle, missed), fed at finish_step()."""
        if self.staleness == "non_blocking":
            if self._needed_at is not None:  # late: the wait it would have cost at staleness 1
                missed = max(0.0, self._submitted_at + compute_s - self._needed_at)
                self._observed = (0.0, 0.0, missed)
            else:
                self._observed = (0.0, max(0.0, started - self._submitted_at - compute_s), 0.0)
            self._needed_at = None
        elif serves_step == self._step:  # collected in the step it serves (not around a checkpoint)
            if ready:
                self._observed = (0.0, max(0.0, started - self._submitted_at - compute_s), 0.0)
            else:
                self._observed = (ended - started, 0.0, 0.0)

    def _feed_adapter(self) -> None:
        now = self._clock()
        observed, self._observed = self._observed, None
        if observed is not None and self._adapter is not None and self._last_finish is not None:
            waited, idle, missed = observed
            period = now - self._last_finish
            if period > waited:  # always, with a clock that does not go backwards
                self.perturbation_batch_size = self._adapter.observe(
                    step_time_s=period + missed, waited_s=waited + missed, worker_idle_s=idle, step=self._step)
        self._last_finish = now

    def _own_borrowed(self) -> None:
        borrowed, self._borrowed = self._borrowed, None
        if borrowed is None:
            return
        if borrowed is self._current or any(r is borrowed for r in self._held.values()):
            borrowed.perturbation = [t.clone() for t in borrowed.perturbation]

    def _poll(self) -> None:
        """Non-blocking: collect the job in flight only if it is done."""
        if self._inflight is None:
            return
        try:
            done = self._perturber.ready()
        except WorkerError as exc:
            self._inflight = None
            self._fall_back(exc)
            return
        if done:
            self._collect(ready=True)

    def _fall_back(self, exc: WorkerError) -> None:
        """Re-raise, or warn once and continue as synchronous SAM in-process.

        With several ranks the decision waits for the step's agreement (``_agree``): until
        then an in-process perturber stands in, so this step still gets its perturbation.
        """
        if self._agreeing:
            if self._local_failure is None:
                self._local_failure = exc
            _close_quietly(self._perturber)
            self._adopt(InProcessPerturber(_replicated_module(self.model), self.loss_fn, self.rho))
            self._inflight = None
            return
        if self._on_failure == "raise":
            raise exc
        warnings.warn(
            f"asam-tune: perturbation worker failed (pid {exc.pid}, signal {exc.signal}): {exc}; "
            "continuing with synchronous SAM on the main device",
            RuntimeWarning, stacklevel=4)
        self._switch_to_synchronous()

    def _switch_to_synchronous(self) -> None:
        _close_quietly(self._perturber)
        self._adopt(InProcessPerturber(_replicated_module(self.model), self.loss_fn, self.rho))
        self.staleness = 0
        self._held.clear()  # from here on every perturbation is synchronous SAM's
        self._inflight = None
        self._stats.fallbacks += 1

    def _agree(self) -> None:
        """All ranks learn whether any rank's worker failed, and all switch (or raise) now."""
        failed_rank = self._agreement.agree(self._local_failure is not None)
        if failed_rank is None:
            return
        exc, self._local_failure = self._local_failure, None
        self._agreeing = False  # every rank computes in-process from here: nothing left to agree on
        if self._on_failure == "raise":
            if exc is not None:
                raise exc
            raise WorkerError(f"the perturbation worker of rank {failed_rank} failed; every rank stops "
                              f"in step {self._step} (on_worker_failure='raise')")
        cause = (f"this rank's perturbation worker failed (pid {exc.pid}, signal {exc.signal}): {exc}"
                 if exc is not None else f"the perturbation worker of rank {failed_rank} failed")
        warnings.warn(f"asam-tune: {cause}; every rank continues with synchronous SAM from step {self._step}",
                      RuntimeWarning, stacklevel=5)
        self._switch_to_synchronous()

    def _result_from_state(self, entry: dict[str, Any]) -> PerturbationResult:
        try:
            tensors = entry["perturbation"]
            result = PerturbationResult(int(entry["weights_step"]), None, float(entry["compute_time_s"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(f"invalid pending perturbation in AsyncSAM state: {exc!r}") from None
        if tensors is None:
            return result
        shapes = [tuple(p.shape) for p in self._params]
        if not isinstance(tensors, (list, tuple)) or [tuple(getattr(t, "shape", ())) for t in tensors] != shapes:
            raise UserInputError(f"pending perturbation in AsyncSAM state does not match the model's "
                                 f"{len(shapes)} trainable parameters")
        result.perturbation = [t.to(device=p.device, dtype=p.dtype) for t, p in zip(tensors, self._params)]
        return result
