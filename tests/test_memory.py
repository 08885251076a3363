"""What train.py says and decides about memory: the estimate, --auto-batch-size's fit, the CPU allocator
setting, and the share of padding it reports."""

import os
import subprocess
import sys

import pytest
from transformers import Qwen2Config

from pipeline import data, folders, memory, models

import train

# Qwen2.5-Coder-0.5B's configuration (its config.json on the Hub), for the memory estimate.
QWEN_05B = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)


def test_memory_estimate_for_qwen_05b_shows_where_the_memory_goes():
    standard = memory.estimate_peak_memory(QWEN_05B, 4, 512, 16, chunked_loss=False)
    chunked = memory.estimate_peak_memory(QWEN_05B, 4, 512, 16, chunked_loss=True)
    gib = folders.GIB
    assert 0.3 * gib < chunked["weights"] < 0.7 * gib  # 4-bit body + bf16 embedding
    assert standard["loss"] > 4 * gib and chunked["loss"] < 0.5 * gib
    assert chunked["total"] < 2 * gib < 6 * gib < standard["total"] + 2 * gib


def test_fit_batch_keeps_the_effective_batch():
    assert memory.fit_batch(4, 4, lambda b: b <= 8) == (8, 2)
    assert memory.fit_batch(4, 4, lambda b: b <= 3) == (2, 8)
    assert memory.fit_batch(2, 3, lambda b: False) == (1, 6)
    assert memory.fit_batch(16, 1, lambda b: True) == (16, 1)


def test_padding_share_counts_what_padding_to_the_longest_adds():
    assert data.padding_share([[4, 4], [2, 1]]) == pytest.approx(1 - 11 / 12)  # 8 + 4 padded, 11 real
    assert data.padding_share([[4, 4], [2, 1]], pad_to=8) == pytest.approx(1 - 11 / 32)  # the guides' pad-to-max
    assert data.padding_share([[5]]) == 0.0


def test_training_batches_are_grouped_by_length_unless_streamed(demo_prepared, tmp_path):
    """Grouping similar lengths is what keeps padding low (the printed share); a stream of packed blocks has
    nothing to group."""
    args = train.build_parser().parse_args(["--data", str(demo_prepared), "--max-steps", "4"])
    stats = data.prepared_stats(demo_prepared)
    choice = models.DeviceChoice("cpu", "float32", "test")
    settings = train.plan_run(args, stats, choice, True, n_train=78, processes=1, lora_targets=["q_proj"])
    assert train.training_arguments(settings, tmp_path).train_sampling_strategy == "group_by_length"
    assert train.training_arguments(settings, tmp_path, grouped=False).train_sampling_strategy == "sequential"


def test_train_py_has_glibc_give_large_freed_buffers_back():
    """bench/whole_run.py measured 4.3 GiB resident with glibc's defaults, 2.3 GiB with this setting. Checked in a
    process of its own: the setting would stay with the test session's allocator."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    probe = "from pipeline import memory; print(memory.return_freed_memory())"
    env = {key: value for key, value in os.environ.items() if key not in ("MALLOC_MMAP_THRESHOLD_",
                                                                          "PIPELINE_GLIBC_DEFAULTS")}

    def run(extra: dict) -> str:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=folders.REPO_ROOT,
                              env={**env, **extra}, encoding="utf-8")
        return done.stdout.strip()

    assert run({}) == "True" and memory.GLIBC_MMAP_THRESHOLD == 4 * 2**20
    assert run({"MALLOC_MMAP_THRESHOLD_": "131072"}) == "False"  # the user's own setting wins
