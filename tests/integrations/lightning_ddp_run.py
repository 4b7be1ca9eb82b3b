"""Two CPU ranks (gloo) training Classifier with AsyncSAMCallback; each rank saves what it ended with.

``python -m tests.integrations.lightning_ddp_run OUT_DIR``: Lightning's DDP launcher starts rank 1
by running this same command again. Used by tests/integrations/test_lightning.py.
"""
from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

from asam_tune.integrations.lightning import AsyncSAMCallback
from tests.integrations.lightning_models import BATCH, BP, RHO, SEED, Classifier, dataset


def main(out_dir: str) -> None:
    module = Classifier()
    callback = AsyncSAMCallback(RHO, perturbation_device="cpu", perturbation_batch_size=BP, threads=1, seed=SEED)
    trainer = pl.Trainer(callbacks=[callback], accelerator="cpu", devices=2, strategy="ddp", precision="64-true",
                         max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    # Rank r's samples are r, r+2, ...: Lightning's own sampler would shuffle them. The launcher sets
    # LOCAL_RANK for rank 1 before this runs; rank 0 gets it later.
    data = dataset(12)
    shard = Subset(data, range(int(os.environ.get("LOCAL_RANK", "0")), len(data), 2))
    trainer.fit(module, DataLoader(shard, batch_size=BATCH))
    stats = callback.stats()
    torch.save({"weights": {k: v.clone() for k, v in module.state_dict().items()},
                "histogram": dict(stats.staleness_histogram), "fallbacks": stats.fallbacks, "steps": stats.steps},
               f"{out_dir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
