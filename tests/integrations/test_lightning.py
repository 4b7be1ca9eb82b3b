"""AsyncSAMCallback in a real Lightning Trainer against a plain AsyncSAM loop over the same batches.

Each Trainer run starts one CPU worker; the models are tiny and an epoch is a few steps.
"""
from __future__ import annotations

import copy
import os
import signal
import warnings

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from asam_tune.errors import UserInputError  # noqa: E402
from asam_tune.integrations.lightning import AsyncSAMCallback  # noqa: E402
from asam_tune.runtime.async_sam import AsyncSAM  # noqa: E402

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

RHO, LR, BATCH, BP, SEED = 0.05, 0.1, 8, 4, 7


class Classifier(pl.LightningModule):
    """An ordinary module: logs in training_step, with or without an LR scheduler."""

    def __init__(self, scheduler: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
        self.scheduler = scheduler
        # Made in float64: Lightning loads a checkpoint's weights before "64-true" converts the
        # module, so a float32 module would round the restored weights to float32.
        self.double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return {"loss": loss} if batch_idx % 2 else loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)
        if not self.scheduler:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)}


def ascent_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model.net(x), y)


def dataset(batches: int = 6) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(batches * BATCH, 6, generator=generator),
                         torch.randint(0, 3, (batches * BATCH,), generator=generator))


def trainer(callback, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("precision", "64-true")
    return pl.Trainer(callbacks=[callback], accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def callback(**kwargs) -> AsyncSAMCallback:
    kwargs.setdefault("perturbation_device", "cpu")
    return AsyncSAMCallback(RHO, perturbation_batch_size=BP, threads=1, seed=SEED, **kwargs)


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


def test_accumulation_and_clipping_equal_the_plain_loop():
    # 7 batches, 2 per step: 4 steps, the last of one batch; clipping acts on the descent gradient.
    module = Classifier()
    plain = copy.deepcopy(module)
    cb = callback(staleness=1)
    trainer(cb, accumulate_grad_batches=2, gradient_clip_val=0.05).fit(module, DataLoader(dataset(7), batch_size=BATCH))
    expected = reference(plain, dataset(7), staleness=1, accumulate=2, clip=0.05)
    assert max_diff(module, plain) <= 1e-9
    assert cb.stats().steps == 4
    assert cb.stats().staleness_histogram == expected.staleness_histogram == {0: 1, 1: 3}


def test_a_checkpoint_after_an_epoch_resumes_to_the_straight_run(tmp_path):
    straight = Classifier()
    reference(straight, dataset(), staleness=1, epochs=2)

    first = callback()
    run = trainer(first, max_epochs=1)
    run.fit(Classifier(), DataLoader(dataset(), batch_size=BATCH))
    path = tmp_path / "epoch1.ckpt"
    run.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]
    (state,) = saved.values()
    assert state["step"] == 6 and "base_optimizer" not in state

    resumed_module = Classifier()
    torch.nn.init.zeros_(resumed_module.net[0].weight)  # the checkpoint must bring the weights back
    resumed = callback()
    trainer(resumed, max_epochs=2).fit(resumed_module, DataLoader(dataset(), batch_size=BATCH), ckpt_path=path)
    assert max_diff(resumed_module, straight) <= 1e-9
    assert resumed.stats().steps == 12  # the statistics carry on from the checkpoint


def test_bf16_mixed_on_cpu_trains():
    module = Classifier().float()
    before = copy.deepcopy(module)
    cb = callback(staleness=1)
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


def test_bad_options_fail_at_construction_in_one_line():
    with pytest.raises(UserInputError, match="unknown option.*lossfn"):
        AsyncSAMCallback(0.05, lossfn=F.cross_entropy)
    with pytest.raises(UserInputError, match="Invalid staleness"):
        AsyncSAMCallback(0.05, staleness=2)
    with pytest.raises(UserInputError, match="Invalid rho"):
        AsyncSAMCallback(-1.0)
    with pytest.raises(UserInputError, match="before training started"):
        AsyncSAMCallback().stats()
