"""The LightningModule and data the Lightning tests share (no pytest here: the worker imports it)."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

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
