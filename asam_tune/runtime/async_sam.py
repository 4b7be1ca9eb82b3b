"""``AsyncSAM``: asynchronous Sharpness-Aware Minimization around any ``torch.optim`` optimizer.

Step t (staleness 1): the first ``perturbed()`` of the step takes ``e_t`` (the worker's result
for step t, waiting only if it is late; at the first step, or whenever none was prepared, it is
computed now from ``w_t`` on the first ``b_p`` samples of the batch given), then hands the
worker ``w_t`` and the first ``b_p`` samples of the next batch, then adds ``e_t`` to the
weights; leaving the block restores ``w_t`` by copy (bit-identical), also on an exception.
Further ``perturbed()`` blocks in the same step (gradient accumulation) reuse ``e_t``.
``staleness=0`` computes ``e_t`` from ``w_t`` on the current batch (synchronous SAM, same
path). ``"non_blocking"`` never waits once running: it hands a job only when the worker is idle
and applies the newest perturbation it has, recording the staleness it used.

Edges: the last batch a ``lookahead()`` yields has no successor, so nothing is handed to the
worker during that step and the next step computes its perturbation synchronously, as step 0
does. A non-finite perturbation is skipped (that step descends unperturbed) and counted.
``rho=0`` starts no worker and is the base optimizer.

The pieces: ``options`` (plan and arguments), ``schedule`` (which result serves which step),
``failures`` (the worker in use and its fallback), ``adaptation_feed`` (online ``b_p``),
``checkpoint`` (state), ``distributed`` (several ranks); the workers and the SAM math are in
``asam_tune.perturbers``.
"""
from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from asam_tune.errors import UserInputError
from asam_tune.perturbers.ascent import _as_loss, check_ascent_dtype, job_seed, parameters_at
from asam_tune.perturbers.base import AscentJob, AscentTask, PerturbationResult
from asam_tune.perturbers.batches import OutputTargetLoss, batch_size_of, slice_batch, tensor_ids
from asam_tune.perturbers.state_sync import StructureWatch, structure_key
from asam_tune.perturbers.tracing import nvtx_end, nvtx_range, nvtx_start
from asam_tune.perturbers.weights import WeightSwap
from asam_tune.runtime import checkpoint, options, plan_fit, workers
from asam_tune.runtime.adaptation import AdaptationSettings
from asam_tune.runtime.adaptation_feed import AdaptationFeed
from asam_tune.runtime.failures import SupervisedWorker
from asam_tune.runtime.stats import AsyncSAMStats, StatsRecorder, TimelineRecorder
from asam_tune.runtime.hooks import install_hooks
from asam_tune.runtime.lookahead import peek_ahead
from asam_tune.runtime.traffic import JobTraffic

__all__ = ["AsyncSAM"]


class AsyncSAM:
    """SAM whose ascent perturbation runs on a second device, one step behind the weights.

    Args:
        model: any ``torch.nn.Module`` (a DDP wrapper too: the worker uses its inner module).
        base_optimizer: the ``torch.optim.Optimizer`` that takes the descent step. Its
            parameters are the ones perturbed (SAM's convention). LR schedulers attach to it,
            and a ``GradScaler`` steps it (``scaler.step(sam.base_optimizer)``): one backward
            and one unscale per step, as without SAM.
        loss_fn: ``loss_fn(model(x), y)`` for ``(x, y)`` batches; or instead
        compute_loss: ``compute_loss(model, batch) -> loss`` for any batch (a tensor, tuple,
            list or dict of tensors, nested, batch dimension first); a model output holding
            ``loss`` (Hugging Face) is accepted. Runs in the worker on its replica too.
        rho: the perturbation radius at the full batch. The rho applied follows ``b_p``
            through ``rho_rule``.
        plan: a Plan or its path (``asam-tune plan``); explicit arguments override it.
        perturbation_device: None (in-process, synchronous), ``"cpu"`` (a worker process),
            ``"cuda"`` (a second stream of the model's own GPU), ``"cuda:+K"`` (the K-th GPU
            after the model's: each torchrun rank's own), ``"cuda:N"`` (GPU N), or a mapping
            ``{local_rank: device}``. A plan's GPU is read relative to the model's the same way.
        perturbation_batch_size: ``b_p``; None means the whole batch.
        threads, cores: the CPU worker's threads and cores.
        staleness: 1 (the paper's), 0 (synchronous SAM) or ``"non_blocking"``; default the
            plan's mode, else 1.
        adaptive: adaptive SAM's element-wise scaled perturbation (Kwon et al. 2021).
        rho_rule: None (the plan's rule, else the project's default), ``"default"``,
            ``"none"`` (rho fixed) or a ``RhoRule``.
        seed: the seed of the ascent's random draws (dropout); default ``torch.initial_seed()``.
        on_worker_failure: ``"fallback"`` warns once and continues with synchronous SAM;
            ``"raise"`` re-raises the ``WorkerError``. Start-up failures included.
        worker_timeout_s, worker_start_timeout_s: limits for one job and for the start.
        allow_other_machine: use a plan made on another machine.
        perturber: a factory ``f(AscentTask) -> Perturber`` replacing the worker (tests).
        adapt: resize ``b_p`` online (True, False or ``AdaptationSettings``); None turns it on
            for a plan at staleness 1.
        record_timeline: keep the start and end of every step, handover, wait and job.
        clock: the timer adaptation reads (seconds).
        ascent_dtype: ``torch.bfloat16`` or ``torch.float16``: the ascent's forward runs under
            autocast in that dtype in every worker (autocast is per thread, so a descent under
            autocast does not carry over); the gradient norm and the scale stay fp32, the
            perturbation has the parameters' dtype. None: the plan's (the dtype its times were
            measured in), else the parameters' dtype; ``"parameters"``: the parameters' always.
        nvtx: NVTX ranges (``torch.cuda.nvtx``) around each main step, handover and ascent
            job, for an ``nsys`` timeline; nothing happens where CUDA is absent.
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, rho: float = 0.05, *,
                 compute_loss: Callable[[nn.Module, Any], Any] | None = None, plan: Any = None,
                 perturbation_device: str | torch.device | None = None, perturbation_batch_size: int | None = None,
                 threads: int | None = None, cores: Any = None, staleness: int | str | None = None,
                 adaptive: bool = False, rho_rule: Any = None, seed: int | None = None,
                 on_worker_failure: str = "fallback", worker_timeout_s: float = 60.0,
                 worker_start_timeout_s: float = 60.0, allow_other_machine: bool = False,
                 perturber: Callable[[AscentTask], Any] | None = None,
                 adapt: bool | AdaptationSettings | None = None, record_timeline: bool = False,
                 clock: Callable[[], float] = time.perf_counter, ascent_dtype: torch.dtype | str | None = None,
                 nvtx: bool = False):
        options.check_inputs(model, base_optimizer, loss_fn, compute_loss, on_worker_failure, clock, seed,
                             perturber)
        self.adaptive = options.check_flag("adaptive", adaptive)
        check_ascent_dtype(ascent_dtype)
        self.nvtx = options.check_flag("nvtx", nvtx)
        options.check_flag("allow_other_machine", allow_other_machine)
        plan_record = options.load_plan(plan, allow_other_machine) if plan is not None else None
        settings = options.settings_from_plan(plan_record) if plan_record is not None else options.PlanSettings()
        self.ascent_dtype = check_ascent_dtype(ascent_dtype if ascent_dtype is not None else settings.ascent_dtype)
        cores_given = cores is not None
        device, threads, cores = options.worker_placement(
            settings, perturbation_device, threads, cores, perturber,
            main_device=options.main_device_of(workers.replicated_module(model)))

        self.model, self.base_optimizer, self.loss_fn = model, base_optimizer, loss_fn
        self._compute_loss = compute_loss if compute_loss is not None else OutputTargetLoss(loss_fn)
        self.rho = options.check_rho(rho)
        self.rho_rule = options.rho_rule_from(rho_rule, settings.rho_rule)
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self.perturbation_batch_size = options.positive_int(
            "perturbation_batch_size",
            perturbation_batch_size if perturbation_batch_size is not None else settings.batch_size)
        configured = staleness if staleness is not None else settings.staleness
        self._configured_staleness = options.check_staleness(1 if configured is None else configured)
        self.staleness = self._configured_staleness  # becomes 0 after a worker fallback
        self._timeout = options.check_seconds("worker_timeout_s", worker_timeout_s)
        self._clock = clock
        self._task = workers.ascent_task(workers.replicated_module(model), base_optimizer, self._compute_loss,
                                         self.adaptive, warn=True, ascent_dtype=self.ascent_dtype, nvtx=self.nvtx)
        if plan_record is not None:
            plan_fit.check_model(plan_record, self._task.model)
        # The plan's b_p holds at its batch size: fitted to the first batch unless b_p was given.
        self._plan_to_fit = plan_record if perturbation_batch_size is None else None
        self._structure = structure_key(self._task.model, self._task.perturbed)
        self._trainable = workers.trainable_key(base_optimizer)
        self._watch = StructureWatch(self._task.model)
        weakref.finalize(self, self._watch.close)
        self._params = parameters_at(self._task.model, self._task.perturbed)
        if device is not None and device.type == "cuda" and self._params[0].device.type != "cuda":
            raise UserInputError(f"perturbation_device {str(device)!r} needs the model on a CUDA device, "
                                 f"but it is on {self._params[0].device}")
        self._swap = WeightSwap(self._params)
        concurrent = device is not None or perturber is not None
        adapt_settings = options.adaptation_settings(adapt, plan_given=plan is not None, staleness=self.staleness,
                                                     rho=self.rho, concurrent=concurrent)
        self._feed = None if adapt_settings is None else AdaptationFeed(
            adapt_settings, settings.training_batch_size, clock, settings.floor_fraction)
        self._stats = StatsRecorder()
        self._timeline = TimelineRecorder() if options.check_flag("record_timeline", record_timeline) else None
        self._step = 0  # finished steps; the weights are w_step
        self._current: PerturbationResult | None = None  # e_t, chosen at the step's first perturbed()
        self._step_started = self._optimizer_stepped = False
        self._step_began_at: float | None = None
        self._step_range = None  # the main step's NVTX range while open
        self._prefetched: tuple | None = None  # tensor ids of the batch handed over this step
        self._peeked: tuple[int, Any] | None = None
        self._closed = False

        # Several ranks (torchrun, DDP): divide the node's cores among the ranks' workers and
        # agree on worker failures in lockstep (runtime/distributed.py). Collective when built.
        self.placement: Any = None
        group = workers.process_group(model) if self.rho > 0 else None
        if group is not None and perturber is None and device is not None and device.type == "cpu" \
                and not cores_given:
            from asam_tune.runtime.distributed import place_rank

            self.placement = place_rank(
                group, worker_threads=threads or 1, main_cores=settings.main_cores,
                reserved_cores=settings.reserved_cores, expected_local_world_size=settings.nproc_per_node,
                main_device=self._params[0].device)
            threads, cores = self.placement.worker_threads, self.placement.cores.worker
        if group is not None and perturber is None and device is not None and device.type == "cuda":
            from asam_tune.runtime.distributed import check_worker_devices

            check_worker_devices(group, self._params[0].device, device)  # collective
        self._factory = workers.worker_factory(device, threads, cores, self._params[0].device, perturber,
                                       timeout_s=self._timeout, start_timeout_s=options.check_seconds(
                                           "worker_start_timeout_s", worker_start_timeout_s))
        self._worker = SupervisedWorker(self, self._task, policy=on_worker_failure, on_switch=self._on_switch,
                                        timeout_s=self._timeout)
        self._traffic = JobTraffic(self._worker, self._stats, self._timeline, self._feed, clock, self._timeout,
                                   nvtx=self.nvtx)
        self._schedule = self._traffic.schedule  # which result serves which step
        if self.rho > 0:  # rho=0 is the base optimizer: no worker at all
            self._worker.start(self._factory)
        if group is not None and self._worker.concurrent:
            from asam_tune.runtime.distributed import FailureAgreement

            self._worker.agreement = FailureAgreement(group, self._params[0].device)
        self._hooks = install_hooks(self, model, base_optimizer)

    @classmethod
    def from_plan(cls, plan: Any, model: nn.Module, base_optimizer: torch.optim.Optimizer, *args: Any,
                  **kwargs: Any) -> AsyncSAM:
        """``AsyncSAM(model, base_optimizer, ..., plan=plan)``: the plan (or its path) first."""
        return cls(model, base_optimizer, *args, plan=plan, **kwargs)

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
        """The per-step agreement on worker failures under torch.distributed, or None."""
        return self._worker.agreement

    @property
    def worker_pid(self) -> int | None:
        """The worker process's pid (None for in-process and stream workers)."""
        return getattr(self._worker.perturber, "pid", None)

    def rho_at(self, perturbation_batch_size: int, batch_size: int) -> float:
        """The rho applied to a job of ``b_p`` samples of a ``batch_size`` batch."""
        return self.rho_rule.rho_for(self.rho, min(perturbation_batch_size, batch_size), batch_size)

    def __enter__(self) -> AsyncSAM:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker and drop the hooks; idempotent."""
        if self._closed:
            return
        self._closed = True
        for handle in self._hooks:
            handle.remove()
        self._schedule.clear()
        self._worker.close()
        self._watch.close()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def lookahead(self, loader: Iterable, accumulation_steps: int = 1) -> Iterator[Any]:
        """Yield the loader's batches unchanged, peeking ahead so the worker gets the next step's batch.

        With ``accumulation_steps`` k, every k batches make one step and the batch peeked is
        the first of the next step. The last step has no successor: it hands the worker nothing.
        """
        k = options.positive_int("accumulation_steps", accumulation_steps)

        def peeked(following: Any) -> None:
            self._peeked = (self._step, following)

        def step_ended() -> None:
            self._peeked = None

        return peek_ahead(loader, k, peeked, step_ended)

    def step(self, *batch: Any) -> torch.Tensor:
        """One SAM step on ``batch`` (or ``x, y``); returns the loss at ``w_t + e_t``, detached."""
        batch = options.one_batch(batch, "step()")
        self.base_optimizer.zero_grad(set_to_none=True)
        with self.perturbed(batch):
            loss = _as_loss(self._compute_loss(self.model, batch))
            loss.backward()
        self.base_optimizer.step()
        self.base_optimizer.zero_grad(set_to_none=True)
        self.finish_step()
        return loss.detach()

    @contextlib.contextmanager
    def perturbed(self, *batch: Any, next_batch: Any = None) -> Iterator[None]:
        """Weights ``w_t + e_t`` inside the block, ``w_t`` (bit-identical) after it.

        ``batch`` (or ``x, y``) is what the descent uses: ``e_t`` is computed from its first
        ``b_p`` samples when it was not prepared. ``next_batch`` (default: the one
        ``lookahead()`` peeked) is handed to the worker, as ``prefetch()`` does.
        """
        batch = options.one_batch(batch, "perturbed()")
        self._check_usable("perturbed()")
        if self._swap.kept:
            raise UserInputError("perturbed() blocks cannot be nested")
        if not self._step_started:
            self._follow_model()
            self._mark_step_start()
            self._current = self._choose_perturbation(batch)
            self._step_started = True
            self._record_choice(self._current)
        if next_batch is None and self._peeked is not None and self._peeked[0] == self._step:
            next_batch = self._peeked[1]
        if next_batch is not None:
            self.prefetch(next_batch)
        perturbation = None if self._current is None else self._current.perturbation
        if perturbation is None:  # rho=0, or a non-finite perturbation: descend at w_t
            yield
            return
        self._swap.keep()
        try:
            with nvtx_range("asam apply", self.nvtx):
                self._swap.apply(perturbation)
            yield
        finally:
            self._swap.restore()

    def prefetch(self, *next_batch: Any) -> None:
        """Hand the worker ``w_t`` and the first ``b_p`` samples of the next step's batch.

        Call once per step, outside ``perturbed()`` and before the optimizer step. A no-op at
        staleness 0 and with rho=0. In non-blocking mode the batch is passed over when the
        worker is still busy.
        """
        batch = options.one_batch(next_batch, "prefetch()")
        self._check_usable("prefetch()")
        if self._swap.kept:
            raise UserInputError("prefetch() inside perturbed() would hand the worker perturbed weights: "
                                 "pass next_batch= to perturbed() or call prefetch() before it")
        if self._worker.perturber is None or self.rho == 0 or self.staleness == 0:
            return
        self._mark_step_start()
        key = tensor_ids(batch)
        if self._prefetched is not None:
            if self._prefetched == key:
                return  # the same batch again: a step retried, or the next micro-batch
            raise UserInputError(f"prefetch() called twice in step {self._step} with different batches")
        self._prefetched = key
        if self.staleness == "non_blocking":
            self._poll()
            if self._schedule.inflight is not None:
                return
        elif self._schedule.inflight is not None:
            self._collect()  # one job at a time: this is normally e_t itself
        # A fallback during the collect makes SAM synchronous; a failure that the ranks have
        # not agreed on yet makes the next step synchronous on every rank.
        if self.staleness != 0 and self._worker.local_failure is None:
            self._submit(self._step + 1, batch)

    def finish_step(self) -> None:
        """Close step t after the optimizer step: the weights are now ``w_{t+1}``."""
        self._check_usable("finish_step()")
        if self._swap.kept:
            raise UserInputError("finish_step() inside perturbed(): leave the block first")
        self._stats.end_step()
        if self._timeline is not None and self._step_began_at is not None:
            self._timeline.add("main_step", self._step, self._step_began_at, self._clock())
        if self._feed is not None:
            answer = self._feed.finished(self._step)
            if answer is not None:
                self.perturbation_batch_size = answer
        nvtx_end(self._step_range)
        self._step_range = None
        self._step += 1
        self._step_started = self._optimizer_stepped = False
        self._step_began_at = self._prefetched = self._current = None
        self._schedule.prune(self._step, self.staleness == "non_blocking")

    def stats(self) -> AsyncSAMStats:
        trajectory = () if self._feed is None else self._feed.trajectory
        return self._stats.snapshot(self.perturbation_batch_size, trajectory)

    def timeline(self) -> list[dict[str, Any]]:
        """The recorded events (``record_timeline=True``): kind, step, start_s, end_s."""
        if self._timeline is None:
            raise UserInputError("timeline() needs AsyncSAM(..., record_timeline=True)")
        return self._timeline.events()

    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs, base optimizer included (``torch.load(weights_only=True)``).

        Waits for a job in flight (except in non-blocking mode) so that the pending ``e_t`` is saved.
        """
        self._check_between_steps("state_dict()")
        if self._schedule.inflight is not None and self.staleness != "non_blocking":
            self._collect()
            if self._feed is not None:
                self._feed.forget_collect()  # a resumed run never sees this collect
        return checkpoint.state_of(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; rho must match. Load the model's weights too."""
        self._check_between_steps("load_state_dict()")
        if self._step_started or self._prefetched is not None:
            raise UserInputError("load_state_dict() in the middle of a step: call it between steps")
        checkpoint.load_into(self, state)

    # ------------------------------------------------------------------ internals

    def _check_usable(self, what: str) -> None:
        if self._closed:
            raise UserInputError(f"{what} on a closed AsyncSAM")
        if self._optimizer_stepped and what != "finish_step()":
            raise UserInputError(f"{what} after the base optimizer stepped: call sam.finish_step() "
                                 "after every optimizer step")

    def _check_between_steps(self, what: str) -> None:
        if self._swap.kept:
            raise UserInputError(f"{what} inside perturbed(): checkpoint between steps")
        if self._optimizer_stepped:
            raise UserInputError(f"{what} after the optimizer step of an unfinished step: call finish_step() first")

    def _mark_step_start(self) -> None:
        if self._step_began_at is None:
            self._step_began_at = self._clock()
            self._step_range = nvtx_start(f"asam step {self._step}", self.nvtx)
        if self._feed is not None:
            self._feed.step_started()

    def _follow_model(self) -> None:
        """A new trainable set, or parameters replaced: rebuild what depends on them.

        Cheap when nothing changed: the optimizer's parameters and their ``requires_grad``
        flags are compared, and torch's registration hooks say whether anything was reassigned.
        """
        if self._worker.perturber is None or self.rho == 0:
            return
        trainable = workers.trainable_key(self.base_optimizer)
        if trainable == self._trainable and not self._watch.changed:
            return
        self._trainable = trainable
        self._watch.watch(self._task.model)
        task = workers.ascent_task(self._task.model, self.base_optimizer, self._compute_loss, self.adaptive,
                                   ascent_dtype=self.ascent_dtype, nvtx=self.nvtx)
        key = structure_key(task.model, task.perturbed)
        if key == self._structure:
            return
        self._task, self._structure = task, key
        self._params = parameters_at(task.model, task.perturbed)
        self._swap = WeightSwap(self._params)
        self._schedule.clear()
        self._worker.task = task
        warnings.warn(f"asam-tune: the model's parameters changed ({len(task.perturbed)} perturbed now); "
                      "restarting the perturbation worker", RuntimeWarning, stacklevel=4)
        self._worker.close()
        fell_back = self.staleness != self._configured_staleness
        self._worker.start(workers.in_process_factory(self._timeout) if fell_back else self._factory)

    def _record_choice(self, result: PerturbationResult | None) -> None:
        if result is None:
            return
        if result.perturbation is None:
            self._stats.skipped += 1
        else:
            self._stats.add_applied(self._step - result.step)

    def _choose_perturbation(self, batch: Any) -> PerturbationResult | None:
        if self._worker.perturber is None or self.rho == 0:
            return None
        schedule = self._schedule
        if self.staleness == "non_blocking":
            self._poll()
            if self._feed is not None and schedule.inflight is not None and schedule.inflight <= self._step:
                self._feed.went_on_without()
        elif schedule.inflight == self._step and self._step not in schedule.held:
            self._collect()
        self._worker.agree(self._step)  # the fixed point where every rank learns of every failure
        result = schedule.lookup(self._step, self.staleness == "non_blocking")
        return result if result is not None else self._compute_now(batch)

    def _compute_now(self, batch: Any) -> PerturbationResult:
        """e_t from w_t on the first b_p samples of ``batch``, waiting for it."""
        # Two tries: a worker that fails is replaced by the in-process one, which cannot.
        for _ in range(2):
            if self._schedule.inflight is not None:
                self._collect()  # one job at a time
            if self._submit(self._step, batch):
                self._collect()
            if self._step in self._schedule.held:
                return self._schedule.held[self._step]
        raise RuntimeError("the perturbation could not be computed, even in-process")

    def _submit(self, serves_step: int, batch: Any) -> bool:
        size = batch_size_of(batch)
        if self.loss_fn is not None:
            options.check_pair(batch)
        if self._plan_to_fit is not None:
            fit, self._plan_to_fit = plan_fit.fit_batch_size(self._plan_to_fit, size), None
            if fit.warning is not None:
                warnings.warn(f"asam-tune: {fit.warning}", RuntimeWarning, stacklevel=5)
            self.perturbation_batch_size = fit.perturbation_batch_size
        if self._feed is not None and self._feed.adapter is None:
            self.perturbation_batch_size = self._feed.start(self.perturbation_batch_size, size)
        rows = min(self.perturbation_batch_size or size, size)
        rho = self.rho_at(rows, size)
        self._stats.rho_applied = rho
        job = AscentJob(step=self._step, weights=self._params,
                        batch=slice_batch(batch, rows), rho=rho, seed=job_seed(self.seed, serves_step))
        return self._traffic.submit(job, serves_step)

    def _collect(self) -> None:
        self._traffic.collect(self._step, self._current, len(self._params),
                              non_blocking=self.staleness == "non_blocking")

    def _poll(self) -> None:
        self._traffic.poll(self._step, self._current, len(self._params))

    def _on_switch(self) -> None:
        """After a worker failure: synchronous SAM from here on, in-process."""
        self.staleness = 0
        self._schedule.clear()  # from here on every perturbation is synchronous SAM's
        self._stats.fallbacks += 1

