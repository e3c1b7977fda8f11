"""The optimizer's own cost per step, apart from the forward and backward maths.

On a model with many small parameters (a deep, narrow LLaMA) the arithmetic is cheap, so what shows is
the per-parameter machinery: our one post-accumulate hook per parameter (O(P) Python work per
backward) against ``lomo_optim.Lomo``'s pre-accumulate hook that scans every parameter on every call
(O(P^2)). Each method's median step time is compared with a plain ``loss.backward()`` on an identical,
unhooked model (same batch): overhead = step - forward+backward.

    .venv/bin/python benchmarks/bench_hook_overhead.py --layers 8 16 32 64
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lomo_core import LOMO  # noqa: E402


def build(layers: int, hidden: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def median_ms(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        step()
        times.append((time.perf_counter() - tic) * 1000)
    return statistics.median(times)


def measure(layers: int, hidden: int, vocab: int, seq: int, repeats: int) -> dict[str, float]:
    import lomo_optim

    base = build(layers, hidden, vocab)
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(1))
    lr = 1e-6

    plain = copy.deepcopy(base)

    def plain_step():
        loss = plain(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in plain.parameters():
            p.grad = None

    ours = copy.deepcopy(base)
    ours_opt = LOMO(ours, lr=lr)

    def ours_step():
        ours_opt.step(lambda: ours(input_ids=ids, labels=ids).loss)

    ref = copy.deepcopy(base)
    ref_opt = lomo_optim.Lomo(ref, lr=lr)

    def ref_step():
        ref_opt.fused_backward(ref(input_ids=ids, labels=ids).loss, lr)

    sgd_model = copy.deepcopy(base)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=lr)

    def sgd_step():
        sgd.zero_grad(set_to_none=True)
        sgd_model(input_ids=ids, labels=ids).loss.backward()
        sgd.step()

    result = {"params": len(list(base.parameters())), "plain": median_ms(plain_step, repeats)}
    for name, step in (("sgd", sgd_step), ("lomo", ours_step), ("ref_lomo", ref_step)):
        result[name] = median_ms(step, repeats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/bench_hook_overhead.py', *sys.argv[1:]])}`\n")
    print("| layers | parameters | forward+backward ms | SGD step ms | LOMO step ms | lomo_optim.Lomo step ms "
          "| LOMO overhead ms | reference overhead ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for layers in args.layers:
        r = measure(layers, args.hidden, args.vocab, args.seq, args.repeats)
        print(f"| {layers} | {r['params']} | {r['plain']:.1f} | {r['sgd']:.1f} | {r['lomo']:.1f} | "
              f"{r['ref_lomo']:.1f} | {r['lomo'] - r['plain']:.1f} | {r['ref_lomo'] - r['plain']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
