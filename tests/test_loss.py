"""The chunked loss gives the standard loss and LoRA gradients, and leaves the model as it found it."""

import pytest
import torch

from pipeline import data, loss, models, prompts

import train


@pytest.fixture(scope="module")
def lora_model(demo_model):
    model = train.build_model(str(demo_model), models.pick_device(), True, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                              seed=0)
    model.train()
    return model


@pytest.fixture(scope="module")
def batch(demo_prepared):
    from datasets import load_from_disk

    rows = load_from_disk(str(demo_prepared))["train"]
    return data.pad_batch([rows[i] for i in (0, 5, 9)], pad_token_id=0)  # three lengths: real padding


def lora_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def standard_loss(model, batch, num_items=None):
    return model(**batch, num_items_in_batch=num_items).loss


def chunked_step_loss(model, batch, num_items=None, chunk=7):
    with loss.output_layer_skipped(model, chunk_size=chunk) as compute_loss:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return compute_loss(model(**inputs), batch["labels"], num_items)


def test_chunked_loss_equals_standard_loss_and_lora_gradients(lora_model, batch):
    lora_model.zero_grad()
    reference = standard_loss(lora_model, batch)
    reference.backward()
    expected = lora_grads(lora_model)
    lora_model.zero_grad()
    loss = chunked_step_loss(lora_model, batch)
    loss.backward()
    got = lora_grads(lora_model)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_normalises_over_all_tokens_of_the_step(lora_model, batch):
    """Two micro-batches with num_items_in_batch = their labelled tokens together give the gradient of one
    batch holding both: a token-level mean, not a mean of micro-batch means."""
    first = {k: v[:1] for k, v in batch.items()}
    second = {k: v[1:] for k, v in batch.items()}
    num_items = int((batch["labels"][:, 1:] != prompts.IGNORE_INDEX).sum())
    lora_model.zero_grad()
    standard_loss(lora_model, batch).backward()
    expected = lora_grads(lora_model)
    lora_model.zero_grad()
    (chunked_step_loss(lora_model, first, num_items) + chunked_step_loss(lora_model, second, num_items)).backward()
    for name, grad in lora_grads(lora_model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_batch_without_labels_gives_zero_loss_and_zero_gradients(lora_model, batch):
    unlabelled = {**batch, "labels": torch.full_like(batch["labels"], prompts.IGNORE_INDEX)}
    lora_model.zero_grad()
    loss = chunked_step_loss(lora_model, unlabelled)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(g).all() and g.abs().sum() == 0 for g in lora_grads(lora_model).values())


def test_evaluation_under_no_grad_gives_the_same_loss(lora_model, batch):
    with torch.no_grad():
        assert chunked_step_loss(lora_model, batch).item() == pytest.approx(standard_loss(lora_model, batch).item(),
                                                                            rel=1e-5)


def test_output_layer_is_restored_after_training_and_after_an_error(lora_model):
    head = lora_model.get_base_model().lm_head
    with loss.output_layer_skipped(lora_model):
        assert lora_model.get_base_model().lm_head is not head
    assert lora_model.get_base_model().lm_head is head
    with pytest.raises(RuntimeError):
        with loss.output_layer_skipped(lora_model):
            raise RuntimeError("training failed")
    assert lora_model.get_base_model().lm_head is head


def test_frozen_embedding_stays_in_the_compute_dtype_and_norms_in_fp32(demo_model):
    from peft import prepare_model_for_kbit_training

    choice = models.DeviceChoice("cpu", "bfloat16", "test")
    model = prepare_model_for_kbit_training(models.load_model(demo_model, choice, load_in_4bit=True))
    assert model.get_input_embeddings().weight.dtype == torch.float32  # what peft does
    loss.keep_embedding_in_compute_dtype(model, torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16  # tied: the same tensor
    assert model.model.norm.weight.dtype == torch.float32
