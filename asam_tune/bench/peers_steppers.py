"""One training step per method: the runtime's ``AsyncSAM`` where it does the job, pytorch_optimizer's
SAM and LookSAM as peers, and serial prototypes of the remedies the runtime does not have.

All of them take ``step(x, y, next_batch)`` and expose ``scheduled`` (the optimizer the
learning-rate schedule is attached to). ``AsyncSAM`` is used only through its public API
(constructor, ``perturbed``, ``finish_step``, ``stats``, ``close``; a custom ``perturber`` for
the simulated slow worker).

The serial prototypes (``SplitAscent``, ``RandomizedSAM``, ``MESA``) compute the ascent the way
the runtime does: on a private replica of the model in training mode, so the ascent pass leaves
the model's BatchNorm statistics alone, with ``e = rho * g / ||g||``.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from asam_tune.bench.peers_methods import Method, samples
from asam_tune.bench.peers_tasks import Task
from asam_tune.errors import UserInputError

# MESA's fixed settings (the strength lambda is what the benchmark sweeps): distillation
# temperature, the decay of the weights' moving average (a time constant of ~200 steps, about
# six epochs of these runs) and the share of training before the term switches on.
MESA_TEMPERATURE = 4.0
MESA_DECAY = 0.995
MESA_START = 0.1


def missing_extra(module: str, extra: str) -> str:
    return f"{module} is not installed: pip install \"asam-tune[{extra}]\""


class _Replica:
    """A private copy of the model for ascent passes: mean-loss gradients at given weights."""

    def __init__(self, model: nn.Module, loss_fn):
        self.model = copy.deepcopy(model).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.loss_fn = loss_fn

    def gradient(self, weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            torch._foreach_copy_(self.params, weights)
        with torch.enable_grad():
            loss = self.loss_fn(self.model(x), y)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]


def _perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor] | None:
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if not torch.isfinite(norm):
        return None
    if norm == 0:
        return [torch.zeros_like(g) for g in grads]
    return [g * (rho / norm) for g in grads]


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class _SerialSAMBase:
    """Descend at ``w + e`` with one backward, restore ``w`` by copy, step the base optimizer."""

    def __init__(self, task: Task, model: nn.Module, rho: float):
        self.model, self.loss_fn, self.rho = model, task.loss_fn, rho
        self.scheduled = task.make_optimizer(model.parameters())
        self.params = _params(model)
        self.replica = _Replica(model, task.loss_fn)
        self.skipped = 0

    def weights(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.params]

    def descend(self, x, y, e: list[torch.Tensor] | None) -> None:
        self.scheduled.zero_grad(set_to_none=True)
        if e is None:
            self.loss_fn(self.model(x), y).backward()
        else:
            clean = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                torch._foreach_add_(self.params, e)
            try:
                self.loss_fn(self.model(x), y).backward()
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(self.params, clean)
        self.scheduled.step()
        self.scheduled.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {"skipped_perturbations": self.skipped}


class PlainStep:
    """The base optimizer alone (SGD in the tables, whatever the task's optimizer is)."""

    def __init__(self, task: Task, model: nn.Module):
        self.model, self.loss_fn = model, task.loss_fn
        self.scheduled = task.make_optimizer(model.parameters())

    def step(self, x, y, next_batch) -> None:
        self.scheduled.zero_grad(set_to_none=True)
        self.loss_fn(self.model(x), y).backward()
        self.scheduled.step()

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {}


class SlowWorker:
    """A perturber factory whose jobs compute in-process but are ready ``steps_per_job`` main steps later.

    It stands for a worker that processes ``beta * B`` samples per main step: a job of ``b_p``
    samples takes ``ceil(b_p / (beta * B))`` steps. ``tick()`` is called once per finished
    main step. Used with ``staleness="non_blocking"``, whose main step never waits for it.
    ``AsyncSAM`` calls it with the run's ``AscentTask``; the math is the runtime's own
    (``InProcessPerturber``), only the moment the result may be collected is delayed.
    """

    def __init__(self, steps_per_job: int):
        self.steps_per_job = steps_per_job
        self._inner = None
        self._clock = 0
        self._ready_at: int | None = None

    def __call__(self, task):
        from asam_tune.perturbers import InProcessPerturber

        self._inner = InProcessPerturber(task)
        return self

    def submit(self, job) -> None:
        self._inner.submit(job)
        self._ready_at = self._clock + self.steps_per_job

    def ready(self) -> bool:
        return self._ready_at is not None and self._clock >= self._ready_at and self._inner.ready()

    def collect(self, timeout: float | None = None):
        if self._ready_at is None:
            raise RuntimeError("collect() without a submitted job")
        self._ready_at = None
        return self._inner.collect(timeout)

    def tick(self) -> None:
        self._clock += 1

    def close(self) -> None:
        self._ready_at = None
        if self._inner is not None:
            self._inner.close()


class AsyncSAMStep:
    """``AsyncSAM`` through its explicit public pieces, so the caller's loop owns the look-ahead."""

    def __init__(self, task: Task, model: nn.Module, rho: float, *, staleness, perturbation_batch_size=None,
                 perturbation_device=None, perturber=None, cores=None):
        from asam_tune.runtime import AsyncSAM

        self.model, self.loss_fn = model, task.loss_fn
        self.scheduled = task.make_optimizer(model.parameters())
        self._perturber = perturber
        options: dict[str, Any] = {}
        if cores is not None:
            options["cores"] = cores
            options["threads"] = len(cores)
        # rho_rule "none": every method's rho here is the rho applied at its own b_p (chosen on
        # the validation split, or the rule's value computed by peers_rho), never rescaled.
        self.sam = AsyncSAM(model, self.scheduled, task.loss_fn, rho, staleness=staleness,
                            perturbation_batch_size=perturbation_batch_size,
                            perturbation_device=perturbation_device, perturber=perturber, adapt=False,
                            rho_rule="none", **options)

    def step(self, x, y, next_batch) -> None:
        self.scheduled.zero_grad(set_to_none=True)
        with self.sam.perturbed(x, y, next_batch=next_batch):
            self.loss_fn(self.model(x), y).backward()
        self.scheduled.step()
        self.scheduled.zero_grad(set_to_none=True)
        self.sam.finish_step()
        if isinstance(self._perturber, SlowWorker):
            self._perturber.tick()

    def close(self) -> None:
        self.sam.close()

    def stats(self) -> dict:
        stats = asdict(self.sam.stats())
        stats["staleness_histogram"] = {str(k): v for k, v in stats["staleness_histogram"].items()}
        return stats


class PytorchOptimizerSAM:
    """pytorch_optimizer's SAM (or LookSAM), stepped as its documentation says.

    BatchNorm statistics move on the first pass only (pytorch_optimizer's own
    ``enable_running_stats`` / ``disable_running_stats``). LookSAM computes the perturbed
    gradient only every ``k``-th step; in between it takes one backward and reuses the stored
    direction, which is what makes it cheaper than SAM.
    """

    def __init__(self, task: Task, model: nn.Module, rho: float, k: int | None = None, alpha: float | None = None):
        try:
            import pytorch_optimizer
            from pytorch_optimizer.optimizer.utils import disable_running_stats, enable_running_stats
        except ImportError:
            raise UserInputError(missing_extra("pytorch_optimizer", "peers")) from None
        self.model, self.loss_fn, self.k = model, task.loss_fn, k
        self._enable, self._disable = enable_running_stats, disable_running_stats
        if k is None:
            self.optimizer = pytorch_optimizer.SAM(model.parameters(), task.optimizer, rho=rho,
                                                   **task.optimizer_kwargs)
        else:
            extra = {} if alpha is None else {"alpha": alpha}
            self.optimizer = pytorch_optimizer.LookSAM(model.parameters(), task.optimizer, rho=rho, k=k,
                                                       **extra, **task.optimizer_kwargs)
        self.scheduled = self.optimizer.base_optimizer
        self.full_steps = 0

    def step(self, x, y, next_batch) -> None:
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        self._enable(self.model)
        self.loss_fn(self.model(x), y).backward()
        if self.k is not None and opt.get_step() % self.k != 0:
            opt.second_step(zero_grad=True)  # one backward: the stored direction is reused
            return
        self.full_steps += 1
        opt.first_step(zero_grad=True)
        self._disable(self.model)
        self.loss_fn(self.model(x), y).backward()
        self._enable(self.model)
        opt.second_step(zero_grad=True)

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {"full_sam_steps": self.full_steps}


class SplitAscent(_SerialSAMBase):
    """The ascent shared: ``b_w`` samples of the next batch at ``w_t`` (the worker, one step stale)
    plus ``b_m`` samples of the current batch at ``w_{t+1}`` (the main device, fresh).

    The two mean-loss gradients are pooled by sample count before normalising. The first step
    has no worker result yet: its worker share is computed on the current batch, as the runtime
    does at step 0.
    """

    def __init__(self, task: Task, model: nn.Module, rho: float, worker_samples: int, main_samples: int):
        super().__init__(task, model, rho)
        self.b_w, self.b_m = worker_samples, main_samples
        self._pending: list[torch.Tensor] | None = None

    def step(self, x, y, next_batch) -> None:
        w = self.weights()
        worker = self._pending if self._pending is not None else self.replica.gradient(w, x[:self.b_w], y[:self.b_w])
        main = self.replica.gradient(w, x[:self.b_m], y[:self.b_m])
        total = self.b_w + self.b_m
        pooled = [(self.b_w * gw + self.b_m * gm) / total for gw, gm in zip(worker, main)]
        e = _perturbation(pooled, self.rho)
        if e is None:
            self.skipped += 1
        # The worker's next job: w_t and the next batch's first b_w samples, as the runtime hands it.
        self._pending = (None if next_batch is None
                         else self.replica.gradient(w, next_batch[0][:self.b_w], next_batch[1][:self.b_w]))
        self.descend(x, y, e)


class RandomizedSAM(_SerialSAMBase):
    """RST: a SAM step (ascent on the whole batch) with probability ``p``, else a plain step."""

    def __init__(self, task: Task, model: nn.Module, rho: float, probability: float, seed: int):
        super().__init__(task, model, rho)
        self.p = probability
        self._generator = torch.Generator().manual_seed(10_000 + seed)
        self.sam_steps = 0

    def step(self, x, y, next_batch) -> None:
        e = None
        if torch.rand((), generator=self._generator).item() < self.p:
            self.sam_steps += 1
            e = _perturbation(self.replica.gradient(self.weights(), x, y), self.rho)
            if e is None:
                self.skipped += 1
        self.descend(x, y, e)

    def stats(self) -> dict:
        return {**super().stats(), "sam_steps": self.sam_steps}


class MESA:
    """MESA: cross-entropy plus ``lambda * T^2 * KL(p_ema / T || p / T)``, one backward per step.

    The teacher is an exponential moving average of the weights (its BatchNorm buffers copied
    from the model); its forward costs no backward. The term starts after ``MESA_START`` of
    training, when the average has settled.
    """

    def __init__(self, task: Task, model: nn.Module, strength: float, total_steps: int):
        self.model, self.loss_fn, self.strength = model, task.loss_fn, strength
        self.scheduled = task.make_optimizer(model.parameters())
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._student = _params(model)
        self._teacher = [p for p, q in zip(self.teacher.parameters(), model.parameters()) if q.requires_grad]
        self._start = math.ceil(MESA_START * total_steps)
        self._step = 0

    def step(self, x, y, next_batch) -> None:
        self.scheduled.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        if self._step >= self._start and self.strength > 0:
            with torch.no_grad():
                target = F.softmax(self.teacher(x) / MESA_TEMPERATURE, dim=1)
            kl = F.kl_div(F.log_softmax(logits / MESA_TEMPERATURE, dim=1), target, reduction="batchmean")
            loss = loss + self.strength * MESA_TEMPERATURE ** 2 * kl
        loss.backward()
        self.scheduled.step()
        self._step += 1
        with torch.no_grad():
            torch._foreach_lerp_(self._teacher, [p.detach() for p in self._student], 1 - MESA_DECAY)
            for t, s in zip(self.teacher.buffers(), self.model.buffers()):
                t.copy_(s)

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {}


def make_stepper(task: Task, method: Method, model: nn.Module, rho: float, *, seed: int, total_steps: int,
                 perturbation_device: str | None = None, cores=None):
    """The stepper for ``method``; ``perturbation_device="cpu"`` gives asynchronous methods a real worker."""
    B = task.batch_size
    kind = method.kind
    if perturbation_device is not None and kind not in ("asam", "nonblocking"):
        raise UserInputError(f"method {method.name!r} has no worker to place on {perturbation_device!r}")
    if kind == "sgd":
        return PlainStep(task, model)
    if kind == "sam":
        return AsyncSAMStep(task, model, rho, staleness=0)
    if kind == "sync":
        return AsyncSAMStep(task, model, rho, staleness=0, perturbation_batch_size=samples(method.fraction, B))
    if kind == "asam":
        return AsyncSAMStep(task, model, rho, staleness=1, perturbation_batch_size=samples(method.fraction, B),
                            perturbation_device=perturbation_device, cores=cores)
    if kind == "nonblocking":
        b_p = samples(method.fraction, B)
        if perturbation_device is not None:  # a real worker: its own speed sets the staleness
            return AsyncSAMStep(task, model, rho, staleness="non_blocking", perturbation_batch_size=b_p,
                                perturbation_device=perturbation_device, cores=cores)
        steps_per_job = max(1, math.ceil(b_p / (method.beta * B)))
        return AsyncSAMStep(task, model, rho, staleness="non_blocking", perturbation_batch_size=b_p,
                            perturber=SlowWorker(steps_per_job))
    if kind == "po-sam":
        return PytorchOptimizerSAM(task, model, rho)
    if kind == "looksam":
        return PytorchOptimizerSAM(task, model, rho, k=method.k, alpha=method.alpha)
    if kind == "split":
        return SplitAscent(task, model, rho, samples(method.fraction, B), samples(method.main_fraction, B))
    if kind == "rst":
        return RandomizedSAM(task, model, rho, method.probability, seed)
    if kind == "mesa":
        return MESA(task, model, rho, total_steps)
    raise UserInputError(f"no stepper for method {method.name!r}")


__all__ = ["make_stepper", "SlowWorker", "missing_extra", "MESA_TEMPERATURE", "MESA_DECAY", "MESA_START"]
