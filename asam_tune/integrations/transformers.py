"""Asynchronous SAM in the Hugging Face ``Trainer``, with the Trainer and its arguments unchanged::

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AsyncSAMCallback(rho=0.05)])

What the callback changes in one optimizer step t (everything else is the Trainer's own):

- The Trainer fetches the step's micro-batches with ``get_batch_samples``; the callback wraps
  that method on this Trainer instance and also reads the *first micro-batch of step t + 1*
  (one item further along the same epoch iterator, handed back to the Trainer unchanged).
- ``on_step_begin``: enters ``AsyncSAM.perturbed(first micro-batch of t, next_batch=first
  micro-batch of t + 1)``: the weights become ``w_t + e_t`` and the worker starts ``e_{t+1}``
  from ``w_t`` on the first ``b_p`` samples of batch t + 1. Every micro-batch of the step (gradient
  accumulation) runs its forward and backward at ``w_t + e_t``.
- ``on_pre_optimizer_step`` (after the Trainer clipped the gradient): leaves the block, so the
  weights are ``w_t`` again, bit-identical; the optimizer then steps from ``w_t`` with the SAM
  gradient, as in SAM. ``on_optimizer_step``: ``finish_step()``.
- ``on_save``: ``AsyncSAM.state_dict()`` is written beside the checkpoint
  (``asam_tune_state.pt``); ``resume_from_checkpoint`` loads it back.

The last step of an epoch has no successor in that epoch's iterator, so the first step of each
epoch computes its perturbation synchronously (as step 0 does). ``rho=0`` wraps nothing and
perturbs nothing: the run is the Trainer's own, bit for bit.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from asam_tune.errors import UserInputError

try:
    import transformers
    from transformers import TrainerCallback
except ImportError:
    raise ImportError('asam_tune.integrations.transformers needs transformers: '
                      'pip install "asam-tune[transformers]"') from None

__all__ = ["STATE_FILE", "AsyncSAMCallback", "ModelOutputLoss"]

STATE_FILE = "asam_tune_state.pt"  # AsyncSAM.state_dict(), saved inside each checkpoint folder
_OWN_ARGUMENTS = ("model", "base_optimizer")


def _async_sam_class() -> type:
    from asam_tune.runtime.async_sam import AsyncSAM

    return AsyncSAM


class ModelOutputLoss:
    """The default ``compute_loss(model, batch)``: the model's own ``outputs.loss`` on the batch dict.

    A class, not a closure, so that it pickles for the CPU worker.
    """

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        outputs = model(**batch) if isinstance(batch, Mapping) else model(batch)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        if loss is None:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise UserInputError(f"the model returned no loss for a batch with {keys}: the batch needs its labels "
                                 "(e.g. 'labels'), or pass AsyncSAMCallback(compute_loss=fn(model, batch))")
        return loss

    def __repr__(self) -> str:
        return "ModelOutputLoss()"


class _Peeking:
    """An epoch iterator that can show its next item without taking it away from the Trainer."""

    def __init__(self, source: Any):
        self.source = source
        self._ahead: list[Any] = []

    def __iter__(self) -> _Peeking:
        return self

    def __next__(self) -> Any:
        if self._ahead:
            return self._ahead.pop(0)
        return next(self.source)

    def peek(self) -> Any:
        """The next item, or None at the end."""
        if not self._ahead:
            try:
                self._ahead.append(next(self.source))
            except StopIteration:
                return None
        return self._ahead[0]


@contextlib.contextmanager
def _without_autocast_forward(model: torch.nn.Module):
    """The model as it was before accelerate wrapped its ``forward`` for mixed precision.

    accelerate's wrapper refuses to be pickled, and the CPU worker's replica is a pickle of the
    model: while ``AsyncSAM`` builds that replica, the instance's own ``forward`` is set aside,
    so the worker computes the ascent in the model's own dtype (float32), without autocast.
    """
    kept = {name: model.__dict__.pop(name) for name in ("forward", "_original_forward") if name in model.__dict__}
    try:
        yield
    finally:
        model.__dict__.update(kept)


def _running_trainer(callback: AsyncSAMCallback) -> tuple[Any, Any]:
    """The ``Trainer`` (and its frame) whose callback handler is calling ``callback`` now.

    Callbacks are not given the Trainer; the call stack always holds it, as ``self`` of the
    Trainer method that fired the event.
    """
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, transformers.Trainer) and any(
                cb is callback for cb in candidate.callback_handler.callbacks):
            return candidate, frame
        frame = frame.f_back
    return None, None


class AsyncSAMCallback(TrainerCallback):
    """``AsyncSAM`` as a ``transformers.TrainerCallback``.

    Args:
        rho, plan, perturbation_device, perturbation_batch_size, staleness, adaptive: as
            ``AsyncSAM``'s. A relative ``plan`` path is resolved now, against the current directory.
        compute_loss: ``compute_loss(model, batch) -> loss`` for the worker's ascent; default
            ``ModelOutputLoss()``: the model's own ``outputs.loss`` on the batch dict (the batch
            must hold its labels). The descent loss stays the Trainer's own ``compute_loss``.
        **options: any other ``AsyncSAM`` keyword (``threads``, ``cores``, ``rho_rule``, ``seed``,
            ``on_worker_failure``, ``worker_timeout_s``, ``adapt``, ``record_timeline``, ...).

    The ``AsyncSAM`` is built at ``on_train_begin`` on the Trainer's model and optimizer (the
    optimizer accelerate wraps), and closed at ``on_train_end`` or when training raises.
    """

    def __init__(self, rho: float = 0.05, *, plan: Any = None, perturbation_device: Any = None,
                 perturbation_batch_size: int | None = None, staleness: int | str | None = None,
                 compute_loss: Any = None, adaptive: bool = False, **options: Any):
        from asam_tune.runtime import options as checks

        accepted = set(inspect.signature(_async_sam_class()).parameters) - set(_OWN_ARGUMENTS)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise UserInputError(f"AsyncSAMCallback got unknown option(s) {unknown} (expected AsyncSAM's: "
                                 f"{', '.join(sorted(accepted))})")
        # What can be checked without a model fails here, not at trainer.train().
        self.rho = checks.check_rho(rho)
        if staleness is not None:
            checks.check_staleness(staleness)
        checks.positive_int("perturbation_batch_size", perturbation_batch_size)
        checks.check_device_form(perturbation_device)
        checks.check_flag("adaptive", adaptive)
        if compute_loss is not None and not callable(compute_loss):
            raise UserInputError(f"Invalid compute_loss: {compute_loss!r:.80} (expected a callable(model, batch))")
        if isinstance(plan, (str, os.PathLike)):
            plan = os.path.abspath(os.fspath(plan))
        if compute_loss is None and options.get("loss_fn") is None:
            compute_loss = ModelOutputLoss()
        self._options = dict(options, rho=self.rho, plan=plan, perturbation_device=perturbation_device,
                             perturbation_batch_size=perturbation_batch_size, staleness=staleness,
                             compute_loss=compute_loss, adaptive=adaptive)
        self.sam: Any = None  # the AsyncSAM of the current (or last) training run
        self._trainer: Any = None
        self._patched: dict[str, Any] = {}
        self._peeking: _Peeking | None = None
        self._window: list[Any] = []
        self._next_first: Any = None
        self._block: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------ public

    def stats(self) -> Any:
        """The ``AsyncSAMStats`` of the current (or last) run: staleness histogram, waits, fallbacks."""
        if self.sam is None:
            raise UserInputError("AsyncSAMCallback.stats() before training started: call trainer.train() first")
        return self.sam.stats()

    # ------------------------------------------------------------------ Trainer events

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer, _ = _running_trainer(self)
        if trainer is not None:
            self._wrap_train(trainer)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        self._close()
        trainer, frame = _running_trainer(self)
        if trainer is None:
            raise UserInputError("AsyncSAMCallback must be called by a transformers.Trainer (none found on the stack)")
        if not callable(getattr(trainer, "get_batch_samples", None)):
            raise UserInputError(f"AsyncSAMCallback needs a Trainer that fetches batches with get_batch_samples "
                                 f"(a recent transformers; 5.24 is tested), found transformers {transformers.__version__}")
        self._trainer = trainer
        self._wrap_train(trainer)
        # accelerate wraps the optimizer; its step hooks and state belong to the inner one.
        base_optimizer = getattr(optimizer, "optimizer", optimizer)
        wrapped = getattr(trainer, "model_wrapped", None)
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            model = wrapped
        with _without_autocast_forward(getattr(model, "module", model)):
            self.sam = _async_sam_class()(model, base_optimizer, **self._options)
        try:
            self._resume(args, state, None if frame is None else frame.f_locals.get("resume_from_checkpoint"))
            if self.rho > 0:
                self._patch(trainer, "get_batch_samples", self._fetch_wrapper(trainer.get_batch_samples))
                self._patch(trainer, "training_step", self._closing_wrapper(trainer.training_step))
        except BaseException:
            self._close()
            raise

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.sam is None or self.rho == 0:
            return
        if not self._window:
            raise RuntimeError("AsyncSAMCallback: the step began without the batches the Trainer fetched")
        block = contextlib.ExitStack()
        block.enter_context(self.sam.perturbed(self._window[0], next_batch=self._next_first))
        self._block = block

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._leave_block()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.sam is not None:
            self._leave_block()
            self.sam.finish_step()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.sam is None or not args.should_save:
            return
        trainer = self._trainer
        run_dir = trainer._get_output_dir(trial=None) if trainer is not None else args.output_dir
        folder = os.path.join(run_dir, f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(f"asam-tune: checkpoint folder {folder} not found; AsyncSAM state not saved",
                          RuntimeWarning, stacklevel=2)
            return
        # The Trainer saves the optimizer itself (optimizer.pt): not a second copy here.
        state = {key: value for key, value in self.sam.state_dict().items() if key != "base_optimizer"}
        torch.save(state, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    # ------------------------------------------------------------------ internals

    def _resume(self, args: Any, state: Any, checkpoint: Any) -> None:
        if not state.global_step:
            return
        folder = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else os.path.join(
            args.output_dir, f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            warnings.warn(f"asam-tune: resuming at step {state.global_step} without {path}: the AsyncSAM state "
                          "(pending perturbation, statistics) starts afresh", RuntimeWarning, stacklevel=3)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        # The optimizer state is the one the Trainer has just loaded from optimizer.pt.
        self.sam.load_state_dict(dict(state, base_optimizer=self.sam.base_optimizer.state_dict()))

    def _fetch_wrapper(self, original: Any) -> Any:
        def get_batch_samples(epoch_iterator: Any, num_batches: int, device: Any) -> Any:
            try:
                peeking = self._peeking
                if peeking is None or peeking.source is not epoch_iterator:
                    peeking = self._peeking = _Peeking(epoch_iterator)
                samples, count = original(peeking, num_batches, device)
                self._window = list(samples)
                # The first micro-batch of the next step, for the worker: ahead by one item.
                self._next_first = peeking.peek() if samples else None
                return samples, count
            except BaseException:
                self._close()
                raise
        return get_batch_samples

    def _closing_wrapper(self, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            except BaseException:
                self._close()
                raise
        return wrapper

    def _wrap_train(self, trainer: Any) -> None:
        """Close the worker when ``train()`` raises anywhere (an evaluation, a save, the optimizer)."""
        if getattr(trainer.train, "_asam_tune_closes", None) is self:
            return
        train = self._closing_wrapper(trainer.train)
        train._asam_tune_closes = self
        trainer.train = train

    def _patch(self, trainer: Any, name: str, replacement: Any) -> None:
        self._patched[name] = trainer.__dict__.get(name)
        setattr(trainer, name, replacement)

    def _unpatch(self) -> None:
        trainer = self._trainer
        for name, before in self._patched.items():
            if trainer is None:
                break
            if before is None:
                trainer.__dict__.pop(name, None)
            else:
                setattr(trainer, name, before)
        self._patched.clear()

    def _leave_block(self) -> None:
        block, self._block = self._block, None
        if block is not None:
            block.close()

    def _close(self) -> None:
        """Restore the weights if inside a step, stop the worker, unwrap the Trainer; idempotent."""
        try:
            self._leave_block()
        finally:
            self._unpatch()
            self._peeking, self._window, self._next_first = None, [], None
            if self.sam is not None:
                self.sam.close()
