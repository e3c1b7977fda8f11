"""The memory model: the paper's figures for LLaMA-7B, the paper's GPU counts, and sensible behaviour."""

from __future__ import annotations

import re

import pytest

from lomo_core.memory_model import GiB, estimate, model_shape, place

LLAMA = {  # the LLaMA family of the paper (vocabulary 32000, SwiGLU MLP)
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "30B": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52),
    "65B": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64),
}
PAPER_RUN = dict(dtype="fp16", batch_size=1, seq_len=512, gradient_checkpointing=True)


def llama(size: str):
    return model_shape({"model_type": "llama", "vocab_size": 32000, **LLAMA[size]})


def gib(x: int) -> float:
    return round(x / GiB, 2)


@pytest.mark.parametrize("optimizer, gradients, state", [("adamw", 12.55, 75.31), ("sgd", 12.55, 25.10),
                                                         ("lomo", 0.24, 0.0)])
def test_llama_7b_model_states_are_the_papers(optimizer, gradients, state):
    shape = llama("7B")
    assert shape.parameters == 6_738_415_616
    e = estimate(shape, optimizer=optimizer, **PAPER_RUN)
    assert (gib(e.parameters_bytes), gib(e.gradients_bytes), gib(e.optimizer_state_bytes)) == (12.55, gradients, state)


@pytest.mark.parametrize("size, gpus", [("7B", 1), ("13B", 2), ("30B", 4), ("65B", 8)])
def test_lomo_takes_the_papers_gpu_counts_on_24_gib_cards(size, gpus):
    placement = place(llama(size), 24 * GiB, 8, optimizer="lomo", **PAPER_RUN)
    assert placement.gpus == gpus, placement.reason
    assert placement.estimate.peak_bytes <= 24 * GiB
    if gpus > 1:  # and one GPU fewer would not do
        assert estimate(llama(size), optimizer="lomo", gpus=gpus // 2, **PAPER_RUN).peak_bytes > 24 * GiB


def test_adamw_7b_is_refused_on_one_card_with_the_alternative():
    placement = place(llama("7B"), 24 * GiB, 8, optimizer="adamw", **PAPER_RUN)
    assert not placement.fits
    needed = float(re.search(r"needs ([0-9.]+) GiB", placement.reason).group(1))
    assert needed == pytest.approx(102.20, rel=0.03)  # the paper's AdamW total, model states + activations
    assert "LOMO needs 1 device" in placement.reason


def test_the_estimate_follows_the_settings():
    shape = llama("7B")
    base = estimate(shape, optimizer="lomo", dtype="bf16", batch_size=4, seq_len=1024)
    assert estimate(shape, optimizer="lomo", dtype="bf16", batch_size=8, seq_len=1024).activations_bytes > \
        base.activations_bytes
    assert estimate(shape, optimizer="lomo", dtype="bf16", batch_size=4, seq_len=1024,
                    gradient_checkpointing=True).activations_bytes < base.activations_bytes / 5
    assert estimate(shape, optimizer="lomo", dtype="bf16", batch_size=4, seq_len=1024,
                    loss_chunk_size=256).activations_bytes < base.activations_bytes
    assert estimate(shape, optimizer="lomo", dtype="fp32", batch_size=4, seq_len=1024).parameters_bytes == \
        2 * base.parameters_bytes
    sharded = estimate(shape, optimizer="lomo", dtype="bf16", batch_size=4, seq_len=1024, gpus=4)
    assert sharded.parameters_bytes == pytest.approx(base.parameters_bytes / 4, rel=1e-6)
    adalomo = estimate(shape, optimizer="adalomo", dtype="bf16", batch_size=4, seq_len=1024)
    assert 0 < adalomo.optimizer_state_bytes < base.parameters_bytes / 100  # factored: rows + columns only


def test_a_pinned_gpu_count_is_used_as_given():
    placement = place(llama("13B"), 24 * GiB, 8, pinned=1, optimizer="lomo", **PAPER_RUN)
    assert not placement.fits and placement.estimate.gpus == 1
    assert place(llama("13B"), 24 * GiB, 8, pinned=4, optimizer="lomo", **PAPER_RUN).gpus == 4


def test_a_model_folder_is_read_in_place(tmp_path):
    from tests.conftest import STORIES, need_shared

    shape = model_shape(need_shared(STORIES))
    assert shape.vocab == 512 and 200_000 < shape.parameters < 400_000
