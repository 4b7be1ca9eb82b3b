"""Every ``asam-tune`` command in one table: its name, a line of help, an example, and where its
flags and its code live (``"module:function"``, imported only for the command that runs, so
``asam-tune plan`` and ``asam-tune show`` never import torch).

A new command, or a new benchmark under ``asam-tune bench``, is one more entry here; its flags
stay in its own ``add_arguments`` function.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    name: str
    summary: str  # one line, shown in the list of commands
    example: str  # one command line, shown at the end of the command's help
    arguments: str  # "module:function(parser)" that adds the command's flags
    run: str  # "module:function(args) -> exit code"
    description: str | None = None  # longer text at the top of the command's help

    def load(self, which: str) -> Any:
        module, _, function = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), function)


COMMANDS: tuple[Command, ...] = (
    Command("profile", "measure step, optimizer and transfer times of a model on this machine",
            "asam-tune profile --workload mnist1d-cnn --quick -o runs/profile.json",
            "asam_tune.cli.commands:add_profile_arguments", "asam_tune.cli.commands:run_profile",
            "Time forward+backward and the optimizer step on every device, CPU thread count and batch size, "
            "the weight transfers between devices and the slowdown when both compute at once. Writes a "
            "profile JSON for 'asam-tune plan'."),
    Command("plan", "choose where and on how much of the next batch the ascent runs (no torch)",
            "asam-tune plan runs/profile.json --batch-size 100 -o runs/plan.json",
            "asam_tune.cli.commands:add_plan_arguments", "asam_tune.cli.commands:run_plan",
            "Read a profile and choose the perturbation device, its threads and cores and b_p (how many "
            "samples of the next batch the ascent gradient uses) so the ascent hides inside the main step. "
            "Writes a plan JSON for AsyncSAM(plan=...), 'asam-tune train' and 'asam-tune tune'."),
    Command("show", "print a profile, plan or tuning record as tables, with a legend (no torch)",
            "asam-tune show runs/plan.json",
            "asam_tune.cli.commands:add_show_arguments", "asam_tune.cli.commands:run_show"),
    Command("train", "train MNIST-1D with SGD, SAM and asynchronous SAM side by side",
            "asam-tune train --plan runs/plan.json --epochs 60 -o runs/results.json",
            "asam_tune.cli.train:add_arguments", "asam_tune.cli.train:run",
            "Train the built-in MNIST-1D CNN from scratch with each optimizer on the same data (a share of "
            "the training labels flipped, where SAM's gain shows) and report test accuracy and time."),
    Command("tune", "refine a plan with short measured trials (Optuna)",
            "asam-tune tune --plan runs/plan.json --trials 12 -o runs/tuned.json",
            "asam_tune.cli.tune:add_arguments", "asam_tune.cli.tune:run",
            "Refine a plan with short windows of real asynchronous-SAM steps on this machine. Writes the "
            "tuned plan, a tuning record beside it (every trial, measured beside predicted) and the Optuna "
            "study (running the same command again resumes it)."),
    Command("bench", "measure speed or accuracy (speed, accuracy, adapt, compare, gpu-check)",
            "asam-tune bench speed --workload mnist1d-cnn --batch-size 100 --plan runs/plan.json",
            "", "",
            "Benchmarks, each stamped with machine, date and commit. Also runnable as "
            "'python -m asam_tune.bench.<name>'."),
)

BENCHES: tuple[Command, ...] = (
    Command("speed", "step times of SGD, SAM and asynchronous SAM measured in one run",
            "asam-tune bench speed --workload mnist1d-cnn --batch-size 100 --plan runs/plan.json",
            "asam_tune.cli.bench:add_speed_arguments", "asam_tune.cli.bench:run_speed",
            "Measure SGD, synchronous SAM and asynchronous SAM step times one after the other in this "
            "process, beside the plan's predictions. Without --plan, profiles (quick) and plans first."),
    Command("accuracy", "MNIST-1D with noisy labels: SGD, SAM and asynchronous SAM over seeds",
            "asam-tune bench accuracy --plan runs/plan.json --seeds 3 --output runs/accuracy.json",
            "asam_tune.bench.accuracy:add_arguments", "asam_tune.bench.accuracy:run"),
    Command("adapt", "does online b_p adaptation bring asynchronous SAM back to SGD's step time?",
            "asam-tune bench adapt --workload mnist1d-cnn --batch-size 100 --steps 400 --output runs/adapt.json",
            "asam_tune.bench.adapt:add_arguments", "asam_tune.bench.adapt:run"),
    Command("compare", "the cost model's plan, the tuned plan and the adapted run side by side",
            "asam-tune bench compare --plan runs/plan.json --tuned runs/tuned.json --output runs/compare.json",
            "asam_tune.bench.compare:add_arguments", "asam_tune.bench.compare:run"),
    Command("gpu-check", "profile, plan and speed-benchmark on a machine with an NVIDIA GPU",
            "asam-tune bench gpu-check --out runs/gpu-check",
            "asam_tune.bench.gpu_check:add_arguments", "asam_tune.bench.gpu_check:run"),
)


def command(name: str, table: tuple[Command, ...] = COMMANDS) -> Command:
    return next(c for c in table if c.name == name)


__all__ = ["BENCHES", "COMMANDS", "Command", "command"]
