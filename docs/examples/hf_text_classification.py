"""Asynchronous SAM in the Hugging Face Trainer: a tiny BERT classifies generated token sequences on the CPU.

    python docs/examples/hf_text_classification.py             # AsyncSAMCallback, CPU worker, b_p = 16
    python docs/examples/hf_text_classification.py --no-sam    # the same Trainer without the callback
    python docs/examples/hf_text_classification.py --overhead --output docs/results/hf-callback-overhead.json

The data are generated here (a sequence is positive when it holds the keyword token), the model
is built from a config with random weights: nothing is downloaded. The Trainer and its
arguments are the usual ones; the only change for SAM is ``callbacks=[AsyncSAMCallback(...)]``.
``--overhead`` times the same Trainer with and without the callback, alternating runs in one
process, and writes the medians with the machine, date, commit and load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import transformers
from transformers import Trainer, TrainingArguments

from asam_tune.integrations.transformers import AsyncSAMCallback

VOCAB, SEQ, KEYWORD = 64, 16, 7


class KeywordSequences(torch.utils.data.Dataset):
    """Random token sequences; half hold the keyword token somewhere, and those are the positives."""

    def __init__(self, samples: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(KEYWORD + 1, VOCAB, (samples, SEQ), generator=generator)
        labels = torch.randint(0, 2, (samples,), generator=generator)
        where = torch.randint(0, SEQ, (samples,), generator=generator)
        ids[labels == 1, where[labels == 1]] = KEYWORD
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def accuracy(prediction: transformers.EvalPrediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


class StepClock(transformers.TrainerCallback):
    """The time between consecutive optimizer steps' ends: the whole step, data and callbacks included."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def step_times(self, skip: int) -> list[float]:
        return [b - a for a, b in zip(self.ends[skip:], self.ends[skip + 1:])]


def run(options: argparse.Namespace, sam: bool, output_dir: str, max_steps: int = -1, eval_data=None,
        synchronous: bool = False):
    """``synchronous``: SAM in the main process (staleness 0), the cost asynchronous SAM hides."""
    device, staleness = (None, 0) if synchronous else ("cpu", 1)
    callback = AsyncSAMCallback(rho=options.rho, perturbation_device=device, staleness=staleness,
                                perturbation_batch_size=options.perturbation_batch_size) if sam else None
    clock = StepClock()
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=options.batch_size,
                             num_train_epochs=options.epochs, max_steps=max_steps, learning_rate=options.lr,
                             use_cpu=True, report_to=[], logging_strategy="no", save_strategy="no",
                             disable_tqdm=True, seed=options.seed)
    trainer = Trainer(model=tiny_bert(options.seed), args=args, train_dataset=KeywordSequences(options.samples, 0),
                      eval_dataset=eval_data, compute_metrics=accuracy,
                      callbacks=[clock] + ([callback] if callback else []))
    trainer.train()
    return trainer, callback, clock


CONFIGURATIONS = ("without", "with", "synchronous")


def overhead(options: argparse.Namespace) -> int:
    """Runs without the callback, with it (CPU worker, staleness 1) and with synchronous SAM in the
    main process, in a rotating order; per run the median step time, then the median over runs."""
    from asam_tune.bench.provenance import emit_result, provenance

    load_before = os.getloadavg()
    medians: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    staleness: list[dict] = []
    waits: list[float] = []  # per asynchronous run: the median time a step waited for the worker
    computes: list[float] = []  # per asynchronous run: the worker's median time for one ascent
    for round_index in range(options.rounds):
        order = CONFIGURATIONS[round_index % 3:] + CONFIGURATIONS[:round_index % 3]
        for name in order:
            _, callback, clock = run(options, name != "without", os.path.join(options.output_dir, "overhead"),
                                     max_steps=options.overhead_steps, synchronous=name == "synchronous")
            medians[name].append(statistics.median(clock.step_times(skip=5)))
            if name == "with":
                stats = callback.stats()
                staleness.append({str(k): v for k, v in stats.staleness_histogram.items()})
                waits.append(stats.wait_median_s)
                computes.append(stats.worker_compute_median_s)
    load_after = os.getloadavg()
    step = {name: statistics.median(values) for name, values in medians.items()}
    result = {
        "what": "HF Trainer step time with AsyncSAMCallback (rho>0, CPU worker, 1 thread, staleness 1), with "
                "synchronous SAM in the main process (the same callback, staleness 0) and without the callback; "
                "per run the median of the time between consecutive steps' ends (first 5 steps skipped), "
                "then the median over runs",
        "provenance": provenance(),
        "settings": {"model": "BertForSequenceClassification hidden 32, 2 layers, 4 heads, seq 16, float32",
                     "batch_size": options.batch_size, "perturbation_batch_size": options.perturbation_batch_size,
                     "steps_per_run": options.overhead_steps, "runs_each": options.rounds,
                     "main_threads": torch.get_num_threads(), "worker_threads": 1,
                     "transformers": transformers.__version__},
        "load_average_1_5_15": {"before": load_before, "after": load_after},
        "median_step_s": step,
        "per_run_median_step_s": medians,
        "ratio_to_without": {name: step[name] / step["without"] for name in CONFIGURATIONS},
        "staleness_histograms": staleness,
        "per_run_median_wait_s": waits,
        "per_run_median_worker_compute_s": computes,
    }
    summary = (f"step time (median): without the callback {step['without'] * 1e3:.2f} ms, with it "
               f"{step['with'] * 1e3:.2f} ms (x{step['with'] / step['without']:.2f}), synchronous SAM "
               f"{step['synchronous'] * 1e3:.2f} ms (x{step['synchronous'] / step['without']:.2f}); waiting for "
               f"the worker {statistics.median(waits) * 1e3:.2f} ms a step, worker ascent "
               f"{statistics.median(computes) * 1e3:.2f} ms; load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    return emit_result(result, options.output, summary)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-sam", action="store_true", help="train without the callback")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--perturbation-batch-size", type=int, default=16)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="the main process's torch threads")
    parser.add_argument("--output-dir", default="hf_example_output", help="the Trainer's output_dir")
    parser.add_argument("--overhead", action="store_true", help="time the Trainer with and without the callback")
    parser.add_argument("--overhead-steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="--overhead: runs of each kind")
    parser.add_argument("--output", help="--overhead: write the result as JSON here")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    if options.overhead:
        return overhead(options)
    started = time.perf_counter()
    trainer, callback, _ = run(options, not options.no_sam, options.output_dir,
                               eval_data=KeywordSequences(512, 1))
    metrics = trainer.evaluate()
    print(f"eval accuracy {metrics['eval_accuracy']:.3f}, {time.perf_counter() - started:.1f} s")
    if callback is not None:
        stats = callback.stats()
        print(f"staleness {dict(stats.staleness_histogram)}, fallbacks {stats.fallbacks}, "
              f"b_p {stats.perturbation_batch_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
