"""The chunked loss gives the standard loss and LoRA gradients; padding and memory figures hold."""

import pytest
import torch
from transformers import Qwen2Config

import chunked_loss
import common
import train

# Qwen2.5-Coder-0.5B's configuration (its config.json on the Hub), for the memory estimate.
QWEN_05B = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def lora_model(demo_model):
    model = train.build_model(str(demo_model), common.pick_device(), True, lora_r=8, lora_alpha=16, lora_dropout=0.0, seed=0)
    model.train()
    return model


@pytest.fixture(scope="module")
def batch(demo_prepared):
    from datasets import load_from_disk

    rows = load_from_disk(str(demo_prepared))["train"]
    return common.pad_batch([rows[i] for i in (0, 5, 9)], pad_token_id=0)  # three lengths: real padding


def lora_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def standard_loss(model, batch, num_items=None):
    return model(**batch, num_items_in_batch=num_items).loss


def chunked_step_loss(model, batch, num_items=None, chunk=7):
    with chunked_loss.output_layer_skipped(model, chunk_size=chunk) as compute_loss:
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
    num_items = int((batch["labels"][:, 1:] != common.IGNORE_INDEX).sum())
    lora_model.zero_grad()
    standard_loss(lora_model, batch).backward()
    expected = lora_grads(lora_model)
    lora_model.zero_grad()
    (chunked_step_loss(lora_model, first, num_items) + chunked_step_loss(lora_model, second, num_items)).backward()
    for name, grad in lora_grads(lora_model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_batch_without_labels_gives_zero_loss_and_zero_gradients(lora_model, batch):
    unlabelled = {**batch, "labels": torch.full_like(batch["labels"], common.IGNORE_INDEX)}
    lora_model.zero_grad()
    loss = chunked_step_loss(lora_model, unlabelled)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(g).all() and g.abs().sum() == 0 for g in lora_grads(lora_model).values())


def test_evaluation_under_no_grad_gives_the_same_loss(lora_model, batch):
    with torch.no_grad():
        assert chunked_step_loss(lora_model, batch).item() == pytest.approx(standard_loss(lora_model, batch).item(), rel=1e-5)


def test_output_layer_is_restored_after_training_and_after_an_error(lora_model):
    head = lora_model.get_base_model().lm_head
    with chunked_loss.output_layer_skipped(lora_model):
        assert lora_model.get_base_model().lm_head is not head
    assert lora_model.get_base_model().lm_head is head
    with pytest.raises(RuntimeError):
        with chunked_loss.output_layer_skipped(lora_model):
            raise RuntimeError("training failed")
    assert lora_model.get_base_model().lm_head is head


def test_frozen_embedding_stays_in_the_compute_dtype_and_norms_in_fp32(demo_model):
    from peft import prepare_model_for_kbit_training

    choice = common.DeviceChoice("cpu", "bfloat16", "test")
    model = prepare_model_for_kbit_training(common.load_model(demo_model, choice, load_in_4bit=True))
    assert model.get_input_embeddings().weight.dtype == torch.float32  # what peft does
    chunked_loss.keep_embedding_in_compute_dtype(model, torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16  # tied: the same tensor
    assert model.model.norm.weight.dtype == torch.float32


def test_memory_estimate_for_qwen_05b_shows_where_the_memory_goes():
    standard = train.estimate_peak_memory(QWEN_05B, 4, 512, 16, chunked_loss=False)
    chunked = train.estimate_peak_memory(QWEN_05B, 4, 512, 16, chunked_loss=True)
    gib = common.GIB
    assert 0.3 * gib < chunked["weights"] < 0.7 * gib  # 4-bit body + bf16 embedding
    assert standard["loss"] > 4 * gib and chunked["loss"] < 0.5 * gib
    assert chunked["total"] < 2 * gib < 6 * gib < standard["total"] + 2 * gib


def test_fit_batch_keeps_the_effective_batch():
    assert train.fit_batch(4, 4, lambda b: b <= 8) == (8, 2)
    assert train.fit_batch(4, 4, lambda b: b <= 3) == (2, 8)
    assert train.fit_batch(2, 3, lambda b: False) == (1, 6)
    assert train.fit_batch(16, 1, lambda b: True) == (16, 1)


def test_length_grouping_keeps_padding_under_5_percent_on_mbpp_lengths():
    """The Trainer's length-grouped sampler, on a length distribution like MBPP's under the Qwen tokenizer
    (877 training problems, median ~200 tokens), pads at most 5 % of an epoch's tokens; random order pads far more."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(0)
    lengths = torch.distributions.LogNormal(torch.log(torch.tensor(200.0)), 0.4).sample((877,)).clamp(60, 512).int().tolist()

    def share(order, batch_size=4):
        return train.padding_share([[lengths[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)])

    grouped = list(LengthGroupedSampler(4, lengths=lengths, generator=generator))
    random_order = torch.randperm(len(lengths), generator=generator).tolist()
    assert share(grouped) <= 0.05 < 0.2 < share(random_order)
