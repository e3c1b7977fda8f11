"""The chunked causal-LM loss equals the model's own loss and gradients, and holds less memory."""

from __future__ import annotations

import pytest
import torch
from conftest import batches, clone, tiny_gpt2, tiny_llama

from lomo_core import LOMO
from lomo_core.data import IGNORE_INDEX
from lomo_core.loss import chunked_causal_lm_loss, supports_chunked_loss
from lomo_core.memory import StepMemoryMeter


def masked_batch(seed: int = 1):
    ids = batches(1, batch=3, seq=16, seed=seed)[0]
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # a prompt
    labels[2, 12:] = IGNORE_INDEX  # padding
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("make", [lambda: tiny_llama(tied=True), lambda: tiny_llama(tied=False), tiny_gpt2],
                         ids=["llama_tied", "llama_untied", "gpt2"])
@pytest.mark.parametrize("chunk", [4, 7, 1000])
def test_loss_and_gradients_equal_the_models_own(make, chunk):
    model = make()
    other = clone(model)
    batch = masked_batch()
    expected = model(**batch).loss
    expected.backward()
    got = chunked_causal_lm_loss(other, batch, chunk)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert supports_chunked_loss(model, batch, chunk)


def test_lomo_with_chunked_loss_follows_lomo_with_the_models_loss():
    a = tiny_llama(tied=True)
    b = clone(a)
    opt_a, opt_b = LOMO(a, lr=0.05, clip_grad_norm=1.0), LOMO(b, lr=0.05, clip_grad_norm=1.0)
    for seed in range(3):
        batch = masked_batch(seed)
        opt_a.step(lambda batch=batch: a(**batch).loss)
        opt_b.step(lambda batch=batch: chunked_causal_lm_loss(b, batch, 5))
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_peak_memory_falls_with_a_large_vocabulary():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    peaks = {}
    for chunked in (False, True):
        model = LlamaForCausalLM(config)
        opt = LOMO(model, lr=0.01)
        ids = torch.randint(0, 8000, (4, 128), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "labels": ids}
        meter = StepMemoryMeter(model, opt, "cpu")
        with meter.measure() as measured:
            opt.step(lambda m=model, b=batch, c=chunked: chunked_causal_lm_loss(m, b, 64) if c else m(**b).loss)
        peaks[chunked] = measured.report.peak_bytes
    logits_bytes = 4 * 128 * 8000 * 4
    assert peaks[True] < peaks[False] - 2 * logits_bytes  # neither the logits nor their gradient held


def test_a_model_whose_logits_are_not_a_plain_projection_is_detected():
    model = tiny_llama()
    original = model.forward

    def scaled_forward(*args, **kwargs):  # e.g. logit soft-capping or scaling
        out = original(*args, **{**kwargs, "labels": None})
        logits = out.logits * 0.5
        labels = kwargs["labels"]
        out.loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
        return out

    model.forward = scaled_forward
    assert not supports_chunked_loss(model, masked_batch(), 8)


def test_chunked_linear_cross_entropy_gradients_with_a_bias():
    from lomo_core.loss import _ChunkedLinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (11,), generator=g)
    # The loss is taken in fp32 (as Hugging Face's is), so compare to fp32 rounding.
    expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), y, reduction="sum")
    got = _ChunkedLinearCrossEntropy.apply(h, w, b, y, 4)
    grads_expected = torch.autograd.grad(expected, (h, w, b))
    grads_got = torch.autograd.grad(got, (h, w, b))
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    for a, e in zip(grads_got, grads_expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
