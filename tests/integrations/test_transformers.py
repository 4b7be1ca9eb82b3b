"""AsyncSAMCallback in the Hugging Face Trainer: a tiny BERT from a config (random weights, no download), CPU."""
from __future__ import annotations

import importlib
import os
import shutil
import signal
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainingArguments, default_data_collator  # noqa: E402

from asam_tune.errors import UserInputError  # noqa: E402
from asam_tune.integrations.transformers import STATE_FILE, AsyncSAMCallback  # noqa: E402
from asam_tune.perturbers.in_process import InProcessPerturber  # noqa: E402
from asam_tune.runtime.async_sam import AsyncSAM  # noqa: E402

SAMPLES, BATCH, SEQ, VOCAB = 48, 8, 6, 32
STEPS_PER_EPOCH = SAMPLES // BATCH


class Tokens(torch.utils.data.Dataset):
    """Generated sequences labelled by their first token's parity."""

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (SAMPLES, SEQ), generator=generator)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class RecordingCollator:
    """The Trainer's batches, in the order its data loader made them."""

    def __init__(self):
        self.batches: list[dict] = []

    def __call__(self, features: list) -> dict:
        batch = default_data_collator(features)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def tiny_bert(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).to(dtype)


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, num_train_epochs=2,
                    use_cpu=True, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=1.0,
                    report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True, seed=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def train(tmp_path, callbacks=(), model=None, resume=None, **overrides):
    model = tiny_bert() if model is None else model
    collator = RecordingCollator()
    trainer = Trainer(model=model, args=arguments(tmp_path, **overrides), train_dataset=Tokens(),
                      data_collator=collator, callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    train.last_trainer = trainer
    return model, collator.batches


def weights(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference(batches: list[dict], accumulation: int = 1, loss_divisor: int = 1, **sam_options) -> torch.nn.Module:
    """The plain AsyncSAM loop over the Trainer's batches: one lookahead per epoch, SGD, clipping at 1.0."""
    model = tiny_bert()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    per_epoch = len(batches) // 2
    with AsyncSAM(model, optimizer, compute_loss=lambda m, b: m(**b).loss, **sam_options) as sam:
        for epoch in range(2):
            for index, batch in enumerate(sam.lookahead(batches[epoch * per_epoch:(epoch + 1) * per_epoch],
                                                        accumulation_steps=accumulation)):
                with sam.perturbed(batch):
                    (model(**batch).loss / loss_divisor).backward()
                if index % accumulation == accumulation - 1:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    sam.finish_step()
    return model


def assert_close(a: dict, b: dict, tolerance: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= tolerance, worst


def test_rho_zero_is_bit_identical_to_no_callback(tmp_path):
    plain, plain_batches = train(tmp_path / "plain")
    callback = AsyncSAMCallback(rho=0)
    with_callback, batches = train(tmp_path / "cb", callbacks=[callback])
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(plain_batches, batches))
    a, b = weights(plain), weights(with_callback)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert callback.stats().steps == 2 * STEPS_PER_EPOCH


def test_rho_changes_the_weights(tmp_path):
    plain, _ = train(tmp_path / "plain", max_steps=2)
    sam, _ = train(tmp_path / "sam", callbacks=[AsyncSAMCallback(rho=0.05, perturber=InProcessPerturber)],
                   max_steps=2)
    a, b = weights(plain), weights(sam)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.process
@pytest.mark.timeout(120)
def test_cpu_worker_staleness_one_and_equals_the_plain_loop(tmp_path):
    callback = AsyncSAMCallback(rho=0.05, perturbation_device="cpu", perturbation_batch_size=4)
    model, batches = train(tmp_path, callbacks=[callback])
    stats = callback.stats()
    # The first step of each epoch has no step before it in that epoch's iterator: synchronous.
    assert stats.staleness_histogram == {0: 2, 1: 2 * STEPS_PER_EPOCH - 2}
    assert stats.fallbacks == 0 and stats.steps == 2 * STEPS_PER_EPOCH
    assert len(batches) == 2 * STEPS_PER_EPOCH
    expected = reference(batches, rho=0.05, perturbation_batch_size=4, perturber=InProcessPerturber)
    assert_close(weights(model), weights(expected), 1e-6)
    assert callback.sam.worker_pid is None  # closed at on_train_end


def test_gradient_accumulation_equals_the_plain_loop(tmp_path):
    callback = AsyncSAMCallback(rho=0.05, perturbation_batch_size=4, perturber=InProcessPerturber)
    model, batches = train(tmp_path, callbacks=[callback], gradient_accumulation_steps=2)
    steps = 2 * STEPS_PER_EPOCH // 2
    assert callback.stats().steps == steps
    assert callback.stats().staleness_histogram == {0: 2, 1: steps - 2}
    # The Trainer's own scaling: a model that takes loss kwargs (BERT here) is trusted to divide
    # by num_items_in_batch itself, so the Trainer adds the micro-batches' losses undivided.
    divisor = 1 if train.last_trainer.model_accepts_loss_kwargs else 2
    expected = reference(batches, accumulation=2, loss_divisor=divisor, rho=0.05, perturbation_batch_size=4,
                         perturber=InProcessPerturber)
    assert_close(weights(model), weights(expected), 1e-6)


def test_save_and_resume_equals_the_straight_run(tmp_path):
    def callback():
        return AsyncSAMCallback(rho=0.05, perturbation_batch_size=4, perturber=InProcessPerturber)

    straight_callback = callback()
    straight, _ = train(tmp_path / "straight", callbacks=[straight_callback])
    first = callback()
    train(tmp_path / "resumed", callbacks=[first], save_strategy="steps", save_steps=4, max_steps=4 + 2)
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-4"
    assert (checkpoint / STATE_FILE).is_file()
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert state["step"] == 4 and [p["serves_step"] for p in state["pending"]] == [4]
    assert "base_optimizer" not in state  # the Trainer's optimizer.pt holds it: not a second copy

    # Resumed from a copy elsewhere, into another output_dir: the state comes from the folder given.
    moved = tmp_path / "moved" / "checkpoint-4"
    shutil.copytree(checkpoint, moved)
    resumed_callback = callback()
    resumed, _ = train(tmp_path / "elsewhere", callbacks=[resumed_callback], resume=str(moved))
    assert_close(weights(resumed), weights(straight), 0.0)
    assert resumed_callback.stats().staleness_histogram == straight_callback.stats().staleness_histogram

    (moved / STATE_FILE).unlink()  # a checkpoint from before the callback: trains on, and says so
    with pytest.warns(RuntimeWarning, match="starts afresh"):
        train(tmp_path / "elsewhere", callbacks=[callback()], resume=str(moved))


@pytest.mark.process
@pytest.mark.timeout(120)
def test_worker_killed_mid_training_falls_back_and_finishes_in_bf16(tmp_path):
    # bf16 on CPU: accelerate wraps the model's forward in autocast, and that wrapper cannot be
    # pickled; the worker's replica is built without it.
    callback = AsyncSAMCallback(rho=0.05, perturbation_device="cpu", perturbation_batch_size=4)

    class Killer(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(callback.sam.worker_pid, signal.SIGKILL)

    with pytest.warns(RuntimeWarning, match="continuing with synchronous SAM"):
        model, _ = train(tmp_path, callbacks=[callback, Killer()], model=tiny_bert(torch.float32), bf16=True)
    stats = callback.stats()
    assert stats.fallbacks == 1 and stats.steps == 2 * STEPS_PER_EPOCH
    assert stats.staleness_histogram.get(1, 0) >= 2  # the worker ran before it was killed
    assert all(torch.isfinite(v).all() for v in weights(model).values())


def test_an_exception_in_training_closes_the_worker_and_restores_the_weights(tmp_path):
    callback = AsyncSAMCallback(rho=0.05, perturber=InProcessPerturber)
    model = tiny_bert()

    class Boom(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 1:
                raise KeyboardInterrupt

    before = {}

    class Keep(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            before.update(weights(model))

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, callbacks=[Keep(), Boom(), callback], model=model)
    assert callback.sam._closed
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # w_1, not w_1 + e_1


def test_a_batch_without_labels_names_the_problem(tmp_path):
    callback = AsyncSAMCallback(rho=0.05, perturber=InProcessPerturber)
    trainer = Trainer(model=tiny_bert(), args=arguments(tmp_path, max_steps=1), train_dataset=Tokens(),
                      data_collator=lambda f: {k: v for k, v in default_data_collator(f).items() if k != "labels"},
                      callbacks=[callback])
    with pytest.raises((UserInputError, ValueError), match="labels"):
        trainer.train()


def test_bad_options_fail_in_one_line():
    with pytest.raises(UserInputError, match="unknown option"):
        AsyncSAMCallback(rho=0.05, rhoo=1)
    with pytest.raises(UserInputError, match="Invalid rho"):
        AsyncSAMCallback(rho=-1)
    with pytest.raises(UserInputError, match="Invalid staleness"):
        AsyncSAMCallback(staleness=2)
    with pytest.raises(UserInputError, match="Invalid perturbation_batch_size"):
        AsyncSAMCallback(perturbation_batch_size=0)
    with pytest.raises(UserInputError, match="Invalid perturbation_device"):
        AsyncSAMCallback(perturbation_device="tpu:0")
    with pytest.raises(UserInputError, match="before training started"):
        AsyncSAMCallback().stats()


def test_relative_plan_path_is_resolved_when_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    callback = AsyncSAMCallback(plan="plan.json")
    assert callback._options["plan"] == str(tmp_path / "plan.json")


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "asam_tune.integrations.transformers")
    with pytest.raises(ImportError, match=r'pip install "asam-tune\[transformers\]"'):
        importlib.import_module("asam_tune.integrations.transformers")
