"""AsyncSAMCallback in a real Lightning Trainer against a plain AsyncSAM loop over the same batches.

A Trainer run with a CPU worker costs the worker's start (torch and lightning imported again,
about 12 s of CPU): the equality with a CPU worker (staleness 0 and 1), the killed worker and
DDP start one; the tests whose subject is the hooks' order (accumulation, precision, resume)
run the ascent in-process, at staleness 1 all the same.
"""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from asam_tune.errors import UserInputError  # noqa: E402
from asam_tune.integrations.lightning import AsyncSAMCallback  # noqa: E402
from asam_tune.runtime.async_sam import AsyncSAM  # noqa: E402
from tests.integrations.lightning_models import BATCH, BP, LR, RHO, SEED, Classifier, ascent_loss, dataset  # noqa: E402

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]


def trainer(callback, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("precision", "64-true")
    return pl.Trainer(callbacks=[callback], accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def callback(**kwargs) -> AsyncSAMCallback:
    kwargs.setdefault("perturbation_device", "cpu")
    if kwargs["perturbation_device"] == "cpu":
        kwargs.setdefault("threads", 1)
    return AsyncSAMCallback(RHO, perturbation_batch_size=BP, seed=SEED, **kwargs)


def reference(module, data, *, staleness, epochs=1, accumulate=1, clip=None, scheduler=False):
    """The plain AsyncSAM loop Lightning's step should reduce to, in float64.

    In-process: the same ascent as the worker's, without starting a second worker.
    """
    loader = DataLoader(data, batch_size=BATCH)
    optimizer = torch.optim.SGD(module.parameters(), lr=LR, momentum=0.9)
    lr_steps = torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5) if scheduler else None
    with AsyncSAM(module, optimizer, compute_loss=ascent_loss, rho=RHO, perturbation_batch_size=BP,
                  staleness=staleness, seed=SEED) as sam:
        for _ in range(epochs):
            batches = [(x.double(), y) for x, y in loader]
            for i, batch in enumerate(sam.lookahead(batches, accumulate)):
                with sam.perturbed(batch):
                    (ascent_loss(module, batch) / accumulate).backward()
                if (i + 1) % accumulate == 0 or i == len(batches) - 1:
                    if clip is not None:
                        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
                    optimizer.step()
                    optimizer.zero_grad()
                    sam.finish_step()
            if lr_steps is not None:
                lr_steps.step()
        return sam.stats()


def max_diff(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("staleness", [0, 1])
def test_one_epoch_equals_the_plain_asyncsam_loop(staleness):
    module = Classifier(scheduler=True)
    plain = copy.deepcopy(module)
    cb = callback(staleness=staleness)
    trainer(cb).fit(module, DataLoader(dataset(), batch_size=BATCH))
    expected = reference(plain, dataset(), staleness=staleness, scheduler=True)
    assert max_diff(module, plain) <= 1e-9
    stats = cb.stats()
    assert stats.steps == 6 and stats.fallbacks == 0
    assert stats.staleness_histogram == expected.staleness_histogram
    assert stats.staleness_histogram == ({0: 6} if staleness == 0 else {0: 1, 1: 5})
    assert module.net[0].weight.dtype == torch.float64
    assert cb.sam.worker_pid is None  # closed at the end of training


class Stream(torch.utils.data.IterableDataset):
    """No length: Lightning's fetcher then prefetches a batch itself, which the look-ahead reuses."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return iter(self.data)


def test_an_iterable_dataset_equals_the_plain_loop():
    module = Classifier()
    plain = copy.deepcopy(module)
    cb = callback(staleness=1, perturbation_device=None)
    trainer(cb).fit(module, DataLoader(Stream(dataset()), batch_size=BATCH))
    expected = reference(plain, dataset(), staleness=1)
    assert max_diff(module, plain) <= 1e-9
    assert cb.stats().staleness_histogram == expected.staleness_histogram == {0: 1, 1: 5}


def test_accumulation_and_clipping_equal_the_plain_loop():
    # 7 batches, 2 per step: 4 steps, the last of one batch; clipping acts on the descent gradient.
    module = Classifier()
    plain = copy.deepcopy(module)
    cb = callback(staleness=1, perturbation_device=None)
    trainer(cb, accumulate_grad_batches=2, gradient_clip_val=0.05).fit(module, DataLoader(dataset(7), batch_size=BATCH))
    expected = reference(plain, dataset(7), staleness=1, accumulate=2, clip=0.05)
    assert max_diff(module, plain) <= 1e-9
    assert cb.stats().steps == 4
    assert cb.stats().staleness_histogram == expected.staleness_histogram == {0: 1, 1: 3}


def test_a_checkpoint_after_an_epoch_resumes_to_the_straight_run(tmp_path):
    straight = Classifier()
    reference(straight, dataset(), staleness=1, epochs=2)

    first = callback(perturbation_device=None)
    run = trainer(first, max_epochs=1)
    run.fit(Classifier(), DataLoader(dataset(), batch_size=BATCH))
    path = tmp_path / "epoch1.ckpt"
    run.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]
    (state,) = saved.values()
    assert state["step"] == 6 and "base_optimizer" not in state

    resumed_module = Classifier()
    torch.nn.init.zeros_(resumed_module.net[0].weight)  # the checkpoint must bring the weights back
    resumed = callback(perturbation_device=None)
    trainer(resumed, max_epochs=2).fit(resumed_module, DataLoader(dataset(), batch_size=BATCH), ckpt_path=path)
    assert max_diff(resumed_module, straight) <= 1e-9
    assert resumed.stats().steps == 12  # the statistics carry on from the checkpoint


class ResumableLoader(DataLoader):
    """A loader whose position a checkpoint keeps (Lightning's state_dict/load_state_dict protocol)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.taken, self._skip = 0, 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self.taken = skip
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self.taken += 1
                yield batch

    def state_dict(self):
        return {"taken": self.taken}

    def load_state_dict(self, state):
        self._skip = state["taken"]


def test_a_checkpoint_mid_epoch_resumes_to_the_straight_run_with_a_resumable_loader(tmp_path):
    # The checkpoint after step 3: the look-ahead has taken batch 3 from the loader (whose state says
    # 4 taken) and the perturbation for step 3 is pending. Both travel in the callback's state.
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(sam_callback, **kwargs):
        saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
        return pl.Trainer(callbacks=[sam_callback, saver], accelerator="cpu", devices=1, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, max_epochs=1, precision="64-true",
                          **kwargs)

    straight, straight_sam = Classifier(), callback(perturbation_device=None)
    run(straight_sam).fit(straight, ResumableLoader(dataset(), batch_size=BATCH))
    path = tmp_path / "epoch=0-step=3.ckpt"
    state = torch.load(path, weights_only=False)["callbacks"][straight_sam.state_key]
    assert state["step"] == 3 and len(state["pending"]) == 1 and len(state["lookahead_items"]) == 1

    resumed_module, resumed = Classifier(), callback(perturbation_device=None)
    run(resumed).fit(resumed_module, ResumableLoader(dataset(), batch_size=BATCH), ckpt_path=path)
    assert max_diff(resumed_module, straight) <= 1e-9
    assert resumed.stats().steps == 6
    assert resumed.stats().staleness_histogram == straight_sam.stats().staleness_histogram == {0: 1, 1: 5}


def test_bf16_mixed_on_cpu_trains():
    module = Classifier().float()
    before = copy.deepcopy(module)
    cb = callback(staleness=1, perturbation_device=None)  # the hooks' order is the worker's too; no start-up
    trainer(cb, precision="bf16-mixed").fit(module, DataLoader(dataset(), batch_size=BATCH))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert max_diff(module, before) > 0
    assert module.net[0].weight.dtype == torch.float32
    assert cb.stats().staleness_histogram == {0: 1, 1: 5} and cb.stats().skipped_perturbations == 0


class KillWorker(pl.Callback):
    def __init__(self, sam_callback, at_batch):
        self.sam_callback, self.at_batch, self.killed = sam_callback, at_batch, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at_batch:
            self.killed = self.sam_callback.sam.worker_pid
            os.kill(self.killed, signal.SIGKILL)


def test_a_killed_worker_falls_back_and_training_finishes():
    module = Classifier()
    cb = callback(staleness=1)
    killer = KillWorker(cb, at_batch=2)
    run = trainer(cb, max_epochs=1)
    run.callbacks.append(killer)
    with pytest.warns(RuntimeWarning, match="continuing with synchronous SAM"):
        run.fit(module, DataLoader(dataset(), batch_size=BATCH))
    assert killer.killed is not None
    stats = cb.stats()
    assert stats.steps == 6 and stats.fallbacks == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


class FailingClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            raise RuntimeError("the module failed")
        return super().training_step(batch, batch_idx)


def test_an_exception_in_training_closes_the_sam_and_unwraps_the_strategy():
    cb = callback(staleness=1, perturbation_device=None)
    run = trainer(cb)
    with pytest.raises(RuntimeError, match="the module failed"):
        run.fit(FailingClassifier(), DataLoader(dataset(), batch_size=BATCH))
    assert "training_step" not in vars(run.strategy)
    with pytest.raises(UserInputError, match="closed"):
        cb.sam.prefetch(next(iter(DataLoader(dataset(), batch_size=BATCH))))
    assert cb.stats().steps == 2
    assert cb.state_dict()["step"] == 2  # a checkpoint saved after the exception still holds AsyncSAM's state


def test_bad_options_fail_at_construction_in_one_line():
    with pytest.raises(UserInputError, match="Invalid perturbation_device"):
        AsyncSAMCallback(0.05, perturbation_device="tpu:0")
    with pytest.raises(UserInputError, match="unknown option.*lossfn"):
        AsyncSAMCallback(0.05, lossfn=F.cross_entropy)
    with pytest.raises(UserInputError, match="Invalid staleness"):
        AsyncSAMCallback(0.05, staleness=2)
    with pytest.raises(UserInputError, match="Invalid rho"):
        AsyncSAMCallback(-1.0)
    with pytest.raises(UserInputError, match="before training started"):
        AsyncSAMCallback().stats()


class PoisonedClassifier(Classifier):
    """The loss of batch 2 is infinite: GradScaler must skip that optimizer step, as without SAM."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        loss = loss["loss"] if isinstance(loss, dict) else loss
        return loss * float("inf") if batch_idx == 2 else loss


def _gradscaler_run_equals_the_plain_loop(device: str, perturbation_device, **trainer_kwargs):
    module = PoisonedClassifier().float()
    plain = copy.deepcopy(module).to(device)
    cb = callback(staleness=1, perturbation_device=perturbation_device)
    run = pl.Trainer(callbacks=[cb], devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, max_epochs=1, gradient_clip_val=0.05, **trainer_kwargs)
    run.fit(module, DataLoader(dataset(), batch_size=BATCH))

    optimizer = torch.optim.SGD(plain.parameters(), lr=LR, momentum=0.9)
    scaler = torch.amp.GradScaler(device)
    batches = [(x.to(device), y.to(device)) for x, y in DataLoader(dataset(), batch_size=BATCH)]
    with AsyncSAM(plain, optimizer, compute_loss=ascent_loss, rho=RHO, perturbation_batch_size=BP, seed=SEED) as sam:
        for i, batch in enumerate(sam.lookahead(batches)):
            with sam.perturbed(batch):
                with torch.autocast(device, dtype=torch.float16):
                    loss = ascent_loss(plain, batch) * (float("inf") if i == 2 else 1.0)
                scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            sam.finish_step()
    assert run.precision_plugin.scaler.get_scale() == scaler.get_scale() < 2.0 ** 16  # one step skipped
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert max_diff(module, plain) <= 1e-5
    assert cb.stats().steps == 6 and cb.stats().staleness_histogram == {0: 1, 1: 5}


def test_16_mixed_gradscaler_unscales_clips_and_skips_as_lightning_does():
    # Lightning refuses precision="16-mixed" on CPU, but its MixedPrecision plugin runs there with
    # a CPU GradScaler: the same step order (closure, unscale_, on_before_optimizer_step, clip,
    # scaler.step, update) as on CUDA.
    from lightning.pytorch.plugins.precision import MixedPrecision

    _gradscaler_run_equals_the_plain_loop("cpu", None, accelerator="cpu", plugins=[MixedPrecision("16-mixed", "cpu")])


@pytest.mark.gpu
def test_16_mixed_on_cuda_with_a_cpu_worker_equals_the_plain_loop():
    _gradscaler_run_equals_the_plain_loop("cuda", "cpu", accelerator="gpu", precision="16-mixed")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ddp_on_cpu_equals_two_plain_loops_with_averaged_gradients(tmp_path):
    # Two ranks, each with its worker, in their own processes (Lightning's launcher reruns the command).
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "tests.integrations.lightning_ddp_run", str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # The reference: rank r's batches are samples r, r+2, ... (DistributedSampler, no shuffle); each
    # rank perturbs with its own batches, and the descent gradient is the ranks' mean.
    data = dataset(12)
    models = [Classifier(), Classifier()]
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9) for m in models]
    sams = [AsyncSAM(m, o, compute_loss=ascent_loss, rho=RHO, perturbation_batch_size=BP, seed=SEED)
            for m, o in zip(models, optimizers)]
    shards = [[(x.double(), y) for x, y in DataLoader(torch.utils.data.Subset(data, range(r, len(data), 2)),
                                                      batch_size=BATCH)] for r in (0, 1)]
    steps = len(shards[0])
    for t in range(steps):
        for r in (0, 1):
            following = shards[r][t + 1] if t + 1 < steps else None
            with sams[r].perturbed(shards[r][t], next_batch=following):
                ascent_loss(models[r], shards[r][t]).backward()
        for p0, p1 in zip(models[0].parameters(), models[1].parameters()):
            mean = (p0.grad + p1.grad) / 2
            p0.grad, p1.grad = mean.clone(), mean.clone()
        for r in (0, 1):
            optimizers[r].step()
            optimizers[r].zero_grad()
            sams[r].finish_step()
    for sam in sams:
        sam.close()

    for rank in ranks:
        assert rank["steps"] == steps and rank["fallbacks"] == 0
        assert rank["histogram"] == {0: 1, 1: steps - 1}
        for name, value in models[0].state_dict().items():
            assert (rank["weights"][name] - value).abs().max().item() <= 1e-9, name


# --- the look-ahead batches of every rank in a DDP checkpoint --------------------------------------------


class _FakeTrainer:
    def __init__(self, world_size: int, global_rank: int):
        self.world_size, self.global_rank = world_size, global_rank


def test_under_ddp_each_rank_resumes_with_its_own_look_ahead_batches(monkeypatch):
    """Only rank 0 writes the checkpoint, but every rank builds it: the look-ahead items go to
    rank 0 by rank (one gather_object that every rank joins) and each rank takes its own back."""
    from asam_tune.integrations import lightning as integration
    from asam_tune.integrations._lightning_parts import PeekingIterator

    rank_items = {0: ["batch 0 of rank 0"], 1: ["batch 0 of rank 1"]}
    calls = []

    class StubSam:
        def state_dict(self):
            return {"step": 3, "base_optimizer": {}}

    def state_on(rank: int, *, peeked: bool = True, gather: bool = True):
        def gather_object(item, output, dst):  # what torch.distributed does, seen from ``rank``
            calls.append((rank, item, dst))
            if output is not None:
                output[:] = [rank_items[0], rank_items[1]]

        monkeypatch.setattr(integration, "_world_size", lambda: 2)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
        monkeypatch.setattr(torch.distributed, "gather_object", gather_object)
        callback = AsyncSAMCallback(RHO)
        callback.sam = StubSam()
        callback._loaders_resumable = True
        callback._fetcher = type("Fetcher", (), {})()
        callback._fetcher.iterator = PeekingIterator(iter(rank_items[rank] + ["later"]))
        if peeked:
            callback._fetcher.iterator.peek(0)
        return callback._state_now(gather=gather)

    state = state_on(0)
    assert state["lookahead_items"] == {"world_size": 2, "by_rank": [rank_items[0], rank_items[1]]}
    assert "base_optimizer" not in state
    assert "lookahead_items" not in state_on(1)  # rank 1 sends its own, writes nothing
    assert calls[-1] == (1, rank_items[1], 0)
    # A rank that has peeked nothing still joins the collective (with nothing), so none waits.
    state_on(1, peeked=False)
    assert calls[-1] == (1, [], 0)
    # After an exception (perhaps on this rank alone) there is no collective: the items are left out.
    before = len(calls)
    assert "lookahead_items" not in state_on(0, gather=False) and len(calls) == before
    # On resume each rank takes its own; another world size, or one process's list, drops them.
    assert integration._items_of_this_rank(state["lookahead_items"], _FakeTrainer(2, 1)) == rank_items[1]
    assert integration._items_of_this_rank(state["lookahead_items"], _FakeTrainer(2, 0)) == rank_items[0]
    with pytest.warns(UserWarning, match="from 2 ranks, this run has 4: they are dropped"):
        assert integration._items_of_this_rank(state["lookahead_items"], _FakeTrainer(4, 1)) is None
    with pytest.warns(UserWarning, match="from one process, this run has 2 ranks: they are dropped"):
        assert integration._items_of_this_rank(["x"], _FakeTrainer(2, 1)) is None
    # One process: the list as before (checkpoints written before keep loading).
    assert integration._items_of_this_rank(["x"], _FakeTrainer(1, 0)) == ["x"]
