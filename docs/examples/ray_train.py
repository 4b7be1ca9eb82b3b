"""Asynchronous SAM under Ray Train: a TorchTrainer on a local Ray (2 CPUs), a CPU perturbation worker.

    python docs/examples/ray_train.py            # about a minute on a 2-core machine

The model and loss are defined here, in the driver script: Ray ships them to its worker by
value, and AsyncSAM ships them on to its perturbation worker the same way (cloudpickle).
"""
import json
import os

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from asam_tune import api
from asam_tune.integrations.ray import placement
from asam_tune import AsyncSAM

PLAN_PATH = None  # e.g. "plan.json" from `asam-tune plan`; loaded below, in the driver


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, x):
        return self.body(x)


def loss_fn(output, target):
    return torch.nn.functional.cross_entropy(output, target)


def train_loop_per_worker(config):
    plan = config["plan"]  # a Plan object: Ray runs this function in its own working directory
    asam_options = placement(plan, perturbation_device="cpu")  # threads for the main step and the worker
    model = ray.train.torch.prepare_model(Net())  # DDP when there are several workers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32 * config["steps"], 40, generator=generator)
    y = torch.randint(0, 10, (32 * config["steps"],), generator=generator)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    with AsyncSAM(model, optimizer, loss_fn, rho=0.05, plan=plan, perturbation_device="cpu",
                  perturbation_batch_size=16, **asam_options) as sam:
        worker_pid = sam.worker_pid
        for inputs, targets in sam.lookahead(loader):
            sam.step(inputs, targets)
        stats = sam.stats()
    print("asam-tune stats:", json.dumps({
        "staleness": {str(k): v for k, v in stats.staleness_histogram.items()}, "fallbacks": stats.fallbacks,
        "main_threads": torch.get_num_threads(), "worker_threads": asam_options["threads"],
        "rank_pid": os.getpid(), "worker_pid": worker_pid}), flush=True)


if __name__ == "__main__":
    plan = api.load_plan(PLAN_PATH) if PLAN_PATH else None
    resources = api.ray_resources_per_worker(plan) if plan else {"CPU": 2}
    ray.init(num_cpus=2, include_dashboard=False)  # a local Ray; on a cluster: ray.init() or `ray job submit`
    try:
        TorchTrainer(train_loop_per_worker, train_loop_config={"plan": plan, "steps": 200},
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker=resources)).fit()
    finally:
        ray.shutdown()
