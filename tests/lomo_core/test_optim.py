"""LOMO / AdaLomo: exact equivalence with torch.optim.SGD and with the reference AdaLomo."""

from __future__ import annotations

import pytest
import torch
from conftest import batches, clone, lm_loss, tiny_gpt2, tiny_llama

from lomo_core import LOMO, AdaLomo
from lomo_core.optim import LossScaleAtMinimumError

MODELS = {
    "llama_tied": lambda: tiny_llama(tied=True),
    "llama_untied": lambda: tiny_llama(tied=False),
    "gpt2": tiny_gpt2,
}
# float32 rounding: the fused update does the same operations as SGD, but the norm is summed in a
# different order, so clipped runs may differ in the last bits.
ATOL = 1e-6


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def sgd_steps(model, data, lr, weight_decay=0.0, clip_norm=None, clip_value=None):
    sgd = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    for ids in data:
        sgd.zero_grad()
        lm_loss(model, ids).backward()
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        sgd.step()


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"weight_decay": 0.05},
        {"clip_grad_norm": 0.5},
        {"clip_grad_value": 0.01},
        {"clip_grad_norm": 0.3, "clip_grad_value": 0.02, "weight_decay": 0.01},
    ],
    ids=["plain", "weight_decay", "clip_norm", "clip_value", "all"],
)
def test_lomo_equals_sgd(arch, kwargs):
    model = MODELS[arch]()
    reference = clone(model)
    data = batches(4)
    opt = LOMO(model, lr=0.05, **kwargs)
    for ids in data:
        opt.step(lambda ids=ids: lm_loss(model, ids))
    sgd_steps(reference, data, 0.05, kwargs.get("weight_decay", 0.0),
              kwargs.get("clip_grad_norm"), kwargs.get("clip_grad_value"))
    before = tiny_llama(tied=True) if arch.startswith("llama") else tiny_gpt2()
    assert max_diff(model, before) > 1e-3  # the parameters did move
    assert max_diff(model, reference) <= ATOL
    assert opt.global_step == len(data)


def test_drop_in_calls_match_step_closure():
    """grad_norm(loss) + fused_backward(loss, lr), as with lomo_optim.Lomo, equals step(closure)."""
    a, b = tiny_llama(), tiny_llama()
    opt_a = LOMO(a, lr=0.1, clip_grad_norm=1.0)
    opt_b = LOMO(b, lr=0.5, clip_grad_norm=1.0)
    for ids in batches(3):
        loss = lm_loss(a, ids)
        norm = opt_a.grad_norm(loss)
        assert norm > 0
        opt_a.fused_backward(loss, 0.1)
        opt_b.param_groups[0]["lr"] = 0.1
        opt_b.step(lambda ids=ids: lm_loss(b, ids))
    assert max_diff(a, b) == 0.0


def test_fused_backward_without_grad_norm_is_refused_when_clipping():
    model = tiny_llama()
    opt = LOMO(model, lr=0.1, clip_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="grad_norm"):
        opt.fused_backward(lm_loss(model, batches(1)[0]), 0.1)


def test_plain_backward_is_refused_with_guidance():
    model = tiny_llama()
    LOMO(model, lr=0.1)
    with pytest.raises(RuntimeError, match="fused_backward"):
        lm_loss(model, batches(1)[0]).backward()


def test_lr_scheduler_drives_the_fused_update():
    model, reference = tiny_llama(), tiny_llama()
    opt = LOMO(model, lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    sgd = torch.optim.SGD(reference.parameters(), lr=0.2)
    sgd_sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0 / (step + 1))
    for ids in batches(3):
        opt.step(lambda ids=ids: lm_loss(model, ids))
        sched.step()
        sgd.zero_grad()
        lm_loss(reference, ids).backward()
        sgd.step()
        sgd_sched.step()
    assert max_diff(model, reference) == 0.0


def test_at_most_one_gradient_alive_during_backward_and_none_after():
    model = tiny_llama(tied=False)
    params = list(model.parameters())
    alive_counts: list[int] = []

    def count(_p):  # registered after LOMO's hook: runs once LOMO has taken its gradient
        alive_counts.append(sum(q.grad is not None for q in params))

    before = []
    for p in params:  # registered before LOMO's hook: sees the gradient just completed
        p.register_post_accumulate_grad_hook(lambda _p: before.append(sum(q.grad is not None for q in params)))
    opt = LOMO(model, lr=0.1, clip_grad_norm=1.0)
    for p in params:
        p.register_post_accumulate_grad_hook(count)
    opt.step(lambda: lm_loss(model, batches(1)[0]))
    assert len(before) == 2 * len(params)  # two passes, every parameter once per pass
    assert max(before) == 1
    assert max(alive_counts) == 0
    assert all(p.grad is None for p in params)
    assert opt.peak_grad_bytes == max(p.numel() * 4 for p in params)


def test_frozen_parameters_are_untouched_and_unhooked():
    model = tiny_llama(tied=False)
    model.model.embed_tokens.weight.requires_grad_(False)
    frozen_before = model.model.embed_tokens.weight.detach().clone()
    reference = clone(model)
    opt = LOMO(model, lr=0.1)
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])
    data = batches(2)
    for ids in data:
        opt.step(lambda ids=ids: lm_loss(model, ids))
    sgd = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1)
    for ids in data:
        sgd.zero_grad()
        lm_loss(reference, ids).backward()
        sgd.step()
    assert torch.equal(model.model.embed_tokens.weight, frozen_before)
    assert max_diff(model, reference) == 0.0


@pytest.mark.parametrize("arch", ["llama_tied", "gpt2"])
def test_gradient_checkpointing_gives_the_same_update(arch):
    model = MODELS[arch]()
    reference = clone(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    reference.train()
    data = batches(3)
    opt = LOMO(model, lr=0.1, clip_grad_norm=1.0)
    for ids in data:
        opt.step(lambda ids=ids: lm_loss(model, ids))
    sgd_steps(reference, data, 0.1, clip_norm=1.0)
    assert max_diff(model, reference) <= ATOL


def test_reentrant_checkpointing_with_a_shared_parameter_is_detected():
    """A parameter whose gradient arrives in pieces must not be updated with a partial gradient."""
    from torch.utils.checkpoint import checkpoint

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            x = checkpoint(self.lin, x, use_reentrant=True)
            return checkpoint(self.lin, x, use_reentrant=True).sum()

    model = Shared()
    opt = LOMO(model, lr=0.1)
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="twice in one backward"):
        opt.step(lambda: model(x))


def test_bf16_update_is_computed_in_fp32():
    model = tiny_llama(dtype=torch.bfloat16)
    ids = batches(1)[0]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    probe = clone(model)
    lm_loss(probe, ids).backward()
    grads = {n: p.grad.detach().clone() for n, p in probe.named_parameters()}
    opt = LOMO(model, lr=0.01, weight_decay=0.1)
    assert opt.scaler is None  # bf16 has fp32's range: no loss scaling
    opt.step(lambda: lm_loss(model, ids))
    for n, p in model.named_parameters():
        p32, g32 = start[n].float(), grads[n].float()
        expected = (p32 - 0.01 * (g32 + 0.1 * p32)).to(torch.bfloat16)
        assert torch.equal(p, expected), n


def test_fp16_overflow_leaves_every_parameter_untouched_and_scale_grows_back():
    model = tiny_llama(dtype=torch.float16)
    opt = LOMO(model, lr=0.01, loss_scale_args={"init_scale": 2.0**10, "scale_window": 2})
    assert opt.scaler is not None and opt.needs_norm_pass
    ids = batches(1)[0]

    # A loss huge enough that its scaled gradients overflow fp16.
    def overflowing():
        return lm_loss(model, ids) * 1e4

    start = [p.detach().clone() for p in model.parameters()]
    opt.step(overflowing)
    assert opt.skipped_steps == 1 and opt.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))
    assert opt.loss_scale == 2.0**9  # backed off

    opt.step(lambda: lm_loss(model, ids))
    opt.step(lambda: lm_loss(model, ids))
    assert opt.global_step == 2
    assert opt.loss_scale == 2.0**10  # grew back after scale_window clean steps
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters()))


def test_fp16_update_equals_unscaled_fp32_arithmetic():
    model = tiny_llama(dtype=torch.float16)
    ids = batches(1)[0]
    probe = clone(model)
    (lm_loss(probe, ids) * 2.0**8).backward()
    opt = LOMO(model, lr=0.01, loss_scale_args={"init_scale": 2.0**8})
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(lambda: lm_loss(model, ids))
    for n, p in model.named_parameters():
        g = dict(probe.named_parameters())[n].grad.float() / 2.0**8
        assert torch.equal(p, (start[n].float() - 0.01 * g).half()), n


def test_loss_scale_at_minimum_raises_a_clear_error():
    model = tiny_llama(dtype=torch.float16)
    opt = LOMO(model, lr=0.01, loss_scale_args={"init_scale": 2.0, "min_scale": 1.0})
    ids = batches(1)[0]
    opt.step(lambda: lm_loss(model, ids) * float("inf"))
    with pytest.raises(LossScaleAtMinimumError, match="minimum loss scale"):
        opt.step(lambda: lm_loss(model, ids) * float("inf"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0}, "lr must be a positive number"),
        ({"lr": -1e-3}, "lr must be a positive number"),
        ({"clip_grad_norm": 0}, "clip_grad_norm must be a positive number"),
        ({"clip_grad_value": -1}, "clip_grad_value must be a positive number"),
        ({"weight_decay": -0.1}, "weight_decay must be a number >= 0"),
        ({"loss_scale_args": {"growth": 2}}, "unknown key"),
        ({"loss_scale_args": {"enabled": True, "scale_factor": 1.0}}, "scale_factor must be > 1"),
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LOMO(tiny_llama(), **kwargs)


def test_state_dict_round_trip_keeps_scaler_and_step():
    model = tiny_llama(dtype=torch.float16)
    opt = LOMO(model, lr=0.01, loss_scale_args={"init_scale": 2.0**10, "scale_window": 3})
    ids = batches(1)[0]
    opt.step(lambda: lm_loss(model, ids) * 1e4)  # one overflow
    opt.step(lambda: lm_loss(model, ids))
    state = opt.state_dict()
    other = LOMO(clone(model), lr=0.5)
    other.load_state_dict(state)
    assert other.loss_scale == opt.loss_scale == 2.0**9
    assert other.global_step == 1 and other.skipped_steps == 1
    assert other.param_groups[0]["lr"] == 0.01
    assert other.scaler.clean_steps == 1


# ---------------------------------------------------------------------------------------- AdaLomo


def reference_adalomo(model, **kwargs):
    """lomo_optim.AdaLomo, which hard-codes .cuda(), made to run on the CPU."""
    lomo_optim = pytest.importorskip("lomo_optim")
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        return lomo_optim.AdaLomo(model, **kwargs)
    finally:
        torch.Tensor.cuda = original


@pytest.mark.parametrize("arch", ["llama_tied", "llama_untied", "gpt2"])
@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1}, {"clip_grad_norm": 0.5}, {"clip_grad_value": 0.005}],
                         ids=["plain", "weight_decay", "clip_norm", "clip_value"])
def test_adalomo_equals_reference(arch, kwargs):
    model = MODELS[arch]()
    reference = clone(model)
    ref_opt = reference_adalomo(reference, lr=1e-2, **kwargs)
    opt = AdaLomo(model, lr=1e-2, loss_scale=2**10, **kwargs)
    for ids in batches(4):
        loss = lm_loss(reference, ids)
        if kwargs.get("clip_grad_norm"):
            ref_opt.grad_norm(loss)
        ref_opt.fused_backward(loss, 1e-2)
        opt.step(lambda ids=ids: lm_loss(model, ids))
    assert max_diff(model, tiny_llama() if arch.startswith("llama") else tiny_gpt2()) > 1e-3
    # Same maths in the same order: the same bits.
    assert max_diff(model, reference) == 0.0


def test_adalomo_runs_on_cpu_without_loss_scale_and_keeps_state_in_state_dict():
    model = tiny_llama()
    opt = AdaLomo(model, lr=1e-2)
    data = batches(4)
    for ids in data[:2]:
        opt.step(lambda ids=ids: lm_loss(model, ids))
    state = opt.state_dict()
    assert len(state["state"]) == len(list(model.parameters()))
    assert all("exp_avg_sq_row" in s or "exp_avg_sq" in s for s in state["state"].values())

    # Resume: a fresh optimizer loaded from the state continues exactly like the original.
    resumed_model = clone(model)
    resumed = AdaLomo(resumed_model, lr=1e-2)
    resumed.load_state_dict(state)
    for ids in data[2:]:
        opt.step(lambda ids=ids: lm_loss(model, ids))
        resumed.step(lambda ids=ids: lm_loss(resumed_model, ids))
    assert max_diff(model, resumed_model) == 0.0


def test_adalomo_state_matters_for_resume():
    model = tiny_llama()
    opt = AdaLomo(model, lr=1e-2)
    data = batches(3)
    for ids in data[:2]:
        opt.step(lambda ids=ids: lm_loss(model, ids))
    restarted_model = clone(model)
    restarted = AdaLomo(restarted_model, lr=1e-2)  # no load_state_dict
    opt.step(lambda: lm_loss(model, data[2]))
    restarted.step(lambda: lm_loss(restarted_model, data[2]))
    assert max_diff(model, restarted_model) > 1e-6


@pytest.mark.parametrize(
    "kwargs, message",
    [({"decay_rate": 0.5}, "decay_rate must be < 0"), ({"clip_threshold": 0}, "clip_threshold"),
     ({"eps": (1e-30,)}, "eps must be two numbers")],
)
def test_adalomo_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaLomo(tiny_llama(), **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_update_without_weight_decay_rounds_once(dtype):
    """The single-kernel path for half parameters gives the fp32 arithmetic, rounded once."""
    model = tiny_llama(dtype=dtype)
    ids = batches(1)[0]
    probe = clone(model)
    scale = 2.0**8 if dtype == torch.float16 else 1.0
    (lm_loss(probe, ids) * scale).backward()
    opt = LOMO(model, lr=0.01, loss_scale_args={"init_scale": scale} if dtype == torch.float16 else None)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(lambda: lm_loss(model, ids))
    grads = dict(probe.named_parameters())
    for n, p in model.named_parameters():
        expected = (start[n].float() - 0.01 * (grads[n].grad.float() * (1.0 / scale))).to(dtype)
        assert torch.equal(p, expected), n


def test_sliced_half_precision_update_equals_whole_tensor_update(monkeypatch):
    """Parameters larger than one slice are updated slice by slice with exactly the same bits."""
    import lomo_core.optim.fused as fused

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(1024, 600), torch.nn.Tanh(), torch.nn.Linear(600, 1)).to(torch.bfloat16)
    assert base[0].weight.numel() > 2 * fused._SLICE
    x = torch.randn(8, 1024, dtype=torch.bfloat16)
    results = []
    for slice_size in (fused._SLICE, 1 << 40):
        monkeypatch.setattr(fused, "_SLICE", slice_size)
        model = clone(base)
        opt = LOMO(model, lr=0.05, weight_decay=0.1, clip_grad_value=0.01, clip_grad_norm=0.5)
        for _ in range(2):
            opt.step(lambda model=model: model(x).float().pow(2).mean())
        results.append(model)
    assert max_diff(results[0], base) > 0
    assert max_diff(results[0], results[1]) == 0.0
