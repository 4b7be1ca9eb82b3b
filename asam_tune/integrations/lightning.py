"""``AsyncSAMCallback``: asynchronous SAM in a PyTorch Lightning ``Trainer``, the module unchanged.

    trainer = Trainer(callbacks=[AsyncSAMCallback(rho=0.05, perturbation_device="cpu")])

The callback drives ``AsyncSAM``'s explicit API (``perturbed(batch, next_batch=...)``) from the
trainer's own step, in automatic optimization:

- ``on_train_start``: builds ``AsyncSAM`` over the module and the trainer's optimizer (after
  the precision plugin converted the module and a checkpoint restored the weights).
- ``on_train_batch_start``: on the first micro-batch of an optimizer step, pulls the first
  batch of the next step from the train data fetcher's iterator and prepares it as Lightning
  does (``convert_input``, ``on_before_batch_transfer``, ``batch_to_device``). At the last
  step of an epoch there is none: the next epoch's first step computes its perturbation
  synchronously, as ``AsyncSAM.lookahead`` does at the end of a loader.
- The strategy's ``training_step`` enters ``perturbed()``: the forward and the backward run
  at ``w_t + e_t``. Lightning calls it inside ``optimizer.step(closure)``, after the step's
  pre-hooks and before the update, which is why the callback wraps it rather than
  ``on_train_batch_start``.
- ``on_after_backward`` (and ``on_before_optimizer_step``, for a skipped backward) restores
  ``w_t``: gradient clipping, ``GradScaler``'s unscale and inf check, and the optimizer step
  all see the descent gradient at the clean weights.
- ``on_train_batch_end`` after an optimizer step: ``finish_step()``.
- ``on_train_end``, ``on_exception``, ``teardown``: the worker stops.

The callback's state in a checkpoint is ``AsyncSAM.state_dict()`` without the base
optimizer's state (Lightning saves that itself) and, when every train loader is resumable
(``state_dict``/``load_state_dict``), the batches the look-ahead took from the loader before
Lightning reached them: the loader's saved position is past them, so a resume hands them on
first.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - exercised in a process without lightning
    raise ImportError('asam_tune.integrations.lightning needs PyTorch Lightning: '
                      'pip install "asam-tune[lightning]"') from None

from asam_tune.errors import UserInputError
from asam_tune.integrations._lightning_parts import PeekingIterator, TrainingStepLoss
from asam_tune.runtime import options
from asam_tune.runtime.async_sam import AsyncSAM

__all__ = ["AsyncSAMCallback", "TrainingStepLoss"]

_EXPLICIT = ("model", "base_optimizer", "loss_fn", "rho", "plan", "perturbation_device", "perturbation_batch_size",
             "staleness", "compute_loss", "adaptive")
_OTHER_OPTIONS = tuple(name for name in inspect.signature(AsyncSAM.__init__).parameters
                       if name not in _EXPLICIT and name != "self")


class AsyncSAMCallback(Callback):
    """Asynchronous SAM for a Lightning ``Trainer``: ``Trainer(callbacks=[AsyncSAMCallback(...)])``.

    Args:
        rho, plan, perturbation_device, perturbation_batch_size, staleness, adaptive: as for
            ``AsyncSAM``.
        compute_loss: ``compute_loss(module, batch) -> loss`` for the ascent; default
            ``TrainingStepLoss()``, the module's own ``training_step`` with logging off.
        **sam_options: any other ``AsyncSAM`` argument (``threads``, ``cores``, ``rho_rule``,
            ``seed``, ``on_worker_failure``, ``worker_timeout_s``, ``adapt``, ...).

    Needs automatic optimization with one optimizer and ``training_step(batch, batch_idx)``.
    ``sam`` is the ``AsyncSAM`` while training runs; ``stats()`` its statistics.
    """

    def __init__(self, rho: float = 0.05, *, plan: Any = None, perturbation_device: Any = None,
                 perturbation_batch_size: int | None = None, staleness: int | str | None = None,
                 compute_loss: Any = None, adaptive: bool = False, **sam_options: Any):
        unknown = sorted(set(sam_options) - set(_OTHER_OPTIONS))
        if unknown:
            raise UserInputError(f"AsyncSAMCallback got unknown option(s) {', '.join(unknown)} "
                                 f"(AsyncSAM takes {', '.join(_EXPLICIT[3:] + _OTHER_OPTIONS)})")
        if compute_loss is not None and not callable(compute_loss):
            raise UserInputError(f"Invalid compute_loss: {compute_loss!r:.80} (expected a callable(module, batch))")
        # Checked now, not at the start of training minutes later.
        options.check_rho(rho)
        options.check_flag("adaptive", adaptive)
        options.positive_int("perturbation_batch_size", perturbation_batch_size)
        if staleness is not None:
            options.check_staleness(staleness)
        options.check_device_form(perturbation_device)
        self._arguments = dict(rho=rho, plan=plan, perturbation_device=perturbation_device,
                               perturbation_batch_size=perturbation_batch_size, staleness=staleness,
                               compute_loss=compute_loss if compute_loss is not None else TrainingStepLoss(),
                               adaptive=adaptive, **sam_options)
        self.sam: AsyncSAM | None = None
        self._state_to_load: dict | None = None
        self._last_state: dict | None = None  # taken before the worker stops, for a checkpoint after fit
        self._strategy: Any = None
        self._batch: Any = None
        self._next_batch: Any = None
        self._perturbed: contextlib.ExitStack | None = None
        self._optimizer_stepping = False
        self._fetcher: Any = None
        self._loaders_resumable = False

    # ------------------------------------------------------------------ public surface

    def stats(self) -> Any:
        """``AsyncSAM.stats()``: the staleness histogram, waits, fallbacks."""
        if self.sam is None:
            raise UserInputError("AsyncSAMCallback.stats() before training started: call it during or after fit()")
        return self.sam.stats()

    def state_dict(self) -> dict[str, Any]:
        if self.sam is None or self.sam._closed:
            return dict(self._last_state or self._state_to_load or {})
        return self._state_now()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._state_to_load = dict(state_dict)
        if self.sam is not None and not self.sam._closed:
            self._load_pending(None)

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        _check_trainer(trainer, pl_module)
        self._close()
        self._fetcher = trainer.fit_loop._data_fetcher
        self._loaders_resumable = _resumable(trainer)
        self.sam = AsyncSAM(pl_module, trainer.optimizers[0], **self._arguments)
        self._last_state = None
        self._load_pending(trainer)
        self._wrap_training_step(trainer.strategy)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch, self._next_batch = batch, None
        sam = self.sam
        if sam is None or sam.rho == 0 or sam.staleness == 0:
            return  # nothing goes to a worker ahead of its step
        every = trainer.accumulate_grad_batches
        if batch_idx % every == 0:
            self._next_batch = self._coming_batch(trainer, every - 1)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self._restore()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._restore()
        self._optimizer_stepping = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._restore()
        self._batch = self._next_batch = None
        if self._optimizer_stepping and self.sam is not None:
            self._optimizer_stepping = False
            self.sam.finish_step()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.sam is not None and not self.sam._closed:
            self._last_state = self._state_now()
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # A checkpoint saved after the exception (OnExceptionCheckpoint runs after this callback,
        # or the user's trainer.save_checkpoint after Ctrl+C) must still hold AsyncSAM's state.
        self._restore()
        if self.sam is not None and not self.sam._closed:
            with contextlib.suppress(Exception):  # mid-step: no consistent state to take
                # Perhaps on this rank alone: no collective (the other ranks may never come).
                self._last_state = self._state_now(gather=False)
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close()

    # ------------------------------------------------------------------ internals

    def _wrap_training_step(self, strategy: Any) -> None:
        original = strategy.training_step
        callback = self

        def training_step(*args: Any, **kwargs: Any) -> Any:
            callback._perturb()
            try:
                return original(*args, **kwargs)
            except BaseException:
                callback._restore()
                raise

        strategy.training_step = training_step  # an instance attribute: deleting it restores the method
        self._strategy = strategy

    def _perturb(self) -> None:
        if self.sam is None or self._batch is None or self._perturbed is not None:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(self.sam.perturbed(self._batch, next_batch=self._next_batch))
        self._perturbed = stack

    def _restore(self) -> None:
        stack, self._perturbed = self._perturbed, None
        if stack is not None:
            stack.close()

    def _coming_batch(self, trainer: Any, n: int) -> Any:
        """The n-th batch after the current one in this epoch, prepared as Lightning prepares it; or None."""
        fetcher = trainer.fit_loop._data_fetcher
        already = list(getattr(fetcher, "batches", ()))  # a fetcher that prefetches holds them here
        if n < len(already):
            item = already[n]
        else:
            if not isinstance(fetcher.iterator, PeekingIterator):
                fetcher.iterator = PeekingIterator(fetcher.iterator)
            item = fetcher.iterator.peek(n - len(already))
        if item is None:
            return None
        batch = item[0]  # the combined loader yields (batch, batch_idx, dataloader_idx)
        batch = trainer.precision_plugin.convert_input(batch)
        batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
        return trainer.strategy.batch_to_device(batch, dataloader_idx=0)

    def _state_now(self, gather: bool = True) -> dict[str, Any]:
        # Batches the look-ahead took from a resumable loader but Lightning has not reached: the
        # loader's own state counts them as taken, so a resume must hand them on first. Each
        # rank took its own (its sampler's share), and only rank 0 writes the checkpoint: under
        # DDP every rank's go to rank 0, by rank (Lightning builds checkpoints on every rank).
        # The collective comes first and runs on every rank whatever its own state, so that a
        # rank failing below cannot leave the others waiting in it.
        iterator = getattr(self._fetcher, "iterator", None)
        items = iterator.ahead if isinstance(iterator, PeekingIterator) and self._loaders_resumable else None
        world = _world_size()
        lookahead: Any = items
        if world > 1:
            lookahead = None
            if gather and self._loaders_resumable:
                lookahead = _gathered_on_rank_0(items or [], world)
        state = _without_optimizer(self.sam.state_dict())
        if lookahead is not None:
            state["lookahead_items"] = lookahead
        return state

    def _load_pending(self, trainer: Any) -> None:
        state, self._state_to_load = self._state_to_load, None
        if state is None:
            return
        items = _items_of_this_rank(state.pop("lookahead_items", None), trainer)
        # The base optimizer's state is Lightning's to restore (and it has): hand its current one back.
        self.sam.load_state_dict(dict(state, base_optimizer=self.sam.base_optimizer.state_dict()))
        if items and trainer is not None and self._loaders_resumable:
            fetcher = trainer.fit_loop._data_fetcher
            fetcher.iterator = PeekingIterator(fetcher.iterator, items)

    def _close(self) -> None:
        self._restore()
        self._batch = self._next_batch = None
        self._optimizer_stepping = False
        if self._strategy is not None:
            self._strategy.__dict__.pop("training_step", None)
            self._strategy = None
        if self.sam is not None:
            self.sam.close()


def _resumable(trainer: Any) -> bool:
    """Lightning's test for loaders whose position a checkpoint keeps (``state_dict``/``load_state_dict``)."""
    from lightning.fabric.utilities.types import _Stateful

    loader = trainer.fit_loop._combined_loader
    return loader is not None and all(isinstance(each, _Stateful) for each in loader.flattened)


def _without_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in state.items() if key != "base_optimizer"}


def _check_trainer(trainer: Any, pl_module: Any) -> None:
    from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher

    if not pl_module.automatic_optimization:
        raise UserInputError("AsyncSAMCallback needs automatic optimization; with manual optimization use "
                             "AsyncSAM's perturbed() in training_step yourself")
    if len(trainer.optimizers) != 1:
        raise UserInputError(f"AsyncSAMCallback needs exactly one optimizer, the trainer has {len(trainer.optimizers)}")
    if isinstance(trainer.fit_loop._data_fetcher, _DataLoaderIterDataFetcher):
        raise UserInputError("AsyncSAMCallback needs training_step(batch, batch_idx), not "
                             "training_step(dataloader_iter): the worker needs the next step's batch")


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gathered_on_rank_0(items: list, world: int) -> dict | None:
    """Every rank's look-ahead items, by rank, on rank 0 (None elsewhere: only rank 0 writes)."""
    dist = torch.distributed
    on_rank_0 = dist.get_rank() == 0
    by_rank: list[Any] | None = [None] * world if on_rank_0 else None
    dist.gather_object(items, by_rank, dst=0)
    return {"world_size": world, "by_rank": by_rank} if on_rank_0 else None


def _items_of_this_rank(items: Any, trainer: Any) -> list | None:
    """This rank's look-ahead items from a checkpoint (a list: one process; by rank under DDP)."""
    world, rank = getattr(trainer, "world_size", 1), getattr(trainer, "global_rank", 0)
    if not isinstance(items, dict):
        if items and world > 1:  # one process's batches: not any rank's share of the data
            warnings.warn(f"the checkpoint's look-ahead batches are from one process, this run has {world} "
                          "ranks: they are dropped (each rank's loader resumes after them)", stacklevel=3)
            return None
        return items
    if items.get("world_size") != world:
        warnings.warn(f"the checkpoint's look-ahead batches are from {items.get('world_size')} ranks, this run has "
                      f"{world}: they are dropped (each rank's loader resumes after them)", stacklevel=3)
        return None
    return items["by_rank"][rank]
