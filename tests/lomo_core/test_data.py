"""Data loading: formats, loss masking, packing, deterministic order, line-numbered errors."""

from __future__ import annotations

import json

import pytest
from conftest import STORIES, need_shared

from lomo_core.data import IGNORE_INDEX, BatchPlan, DataError, Example, collate, load_examples, pack_examples


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(need_shared(STORIES))


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_prompt_response_masks_the_prompt(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Once upon a time", "response": "there was a cat."}])
    data = load_examples(f, tokenizer, 64)
    ex = data.examples[0]
    assert data.format == "instruct"
    prompt_len = 1 + len(tokenizer("Once upon a time", add_special_tokens=False).input_ids)
    response = tokenizer("there was a cat.", add_special_tokens=False).input_ids
    assert ex.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert ex.labels[prompt_len:] == response + [tokenizer.eos_token_id]
    assert ex.input_ids[prompt_len:-1] == response


def test_alpaca_and_chat_records(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                      {"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye now"}]},
    ])
    alpaca, chat = load_examples(f, tokenizer, 256).examples
    trained = [t for t, lab in zip(alpaca.input_ids, alpaca.labels) if lab != IGNORE_INDEX]
    assert tokenizer.decode(trained).strip().startswith("hi")
    chat_trained = tokenizer.decode([t for t, lab in zip(chat.input_ids, chat.labels) if lab != IGNORE_INDEX])
    assert "hi there" in chat_trained and "bye now" in chat_trained
    assert "hello" not in chat_trained


def test_plain_text_file_trains_on_every_token(tmp_path, tokenizer):
    f = tmp_path / "t.txt"
    f.write_text("One day a dog ran.\n\nThe sun was warm.\n")
    data = load_examples(f, tokenizer, 64)
    assert data.format == "text" and len(data.examples) == 2
    assert all(lab != IGNORE_INDEX for lab in data.examples[0].labels[1:])


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "response": ', r"d.jsonl:2: invalid JSON"),
        ('{"prompt": "a"}', r"d.jsonl:2: missing field 'response'"),
        ('{"prompt": "a", "response": "  "}', r"d.jsonl:2: field 'response' is empty"),
        ('{"prompt": "a", "response": 3}', r"d.jsonl:2: field 'response' must be a string"),
        ('{"foo": 1}', r"d.jsonl:2: no usable fields"),
        ('[1, 2]', r"d.jsonl:2: expected a JSON object"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r"d.jsonl:2: no non-empty assistant message"),
    ],
)
def test_malformed_line_is_reported_with_its_number(tmp_path, tokenizer, line, message):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "response": "fine"}, line])
    with pytest.raises(DataError, match=message):
        load_examples(f, tokenizer, 64)


def test_truncation_counts_and_drops_examples_without_response(tmp_path, tokenizer):
    long_prompt = "word " * 100
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": long_prompt, "response": "end"},
        {"prompt": "short", "response": "answer " * 50},
    ])
    data = load_examples(f, tokenizer, 32)
    assert data.truncated == 2 and data.dropped == 1 and len(data.examples) == 1
    assert len(data.examples[0].input_ids) == 32
    with pytest.raises(DataError, match="no example has a response token left"):
        load_examples(write_jsonl(tmp_path / "e.jsonl", [{"prompt": long_prompt, "response": "x"}]), tokenizer, 16)


def test_packing_and_padding():
    rows = [Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4, 5, 6, 7], [4, 5, 6, 7]), Example([8], [8])]
    packed = pack_examples(rows, 3)
    assert [r.input_ids for r in packed] == [[1, 2, 3], [4, 5, 6], [7, 8]]
    batch = collate(rows[:2], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 2, 3, IGNORE_INDEX]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_batch_order_is_deterministic_and_resumable():
    rows = [Example([i, i], [i, i]) for i in range(10)]
    plan = BatchPlan(rows, 3, seed=7, shuffle=True, pad_id=0)
    first = [b["input_ids"][:, 0].tolist() for _, b in plan.iterate(0)]
    again = [b["input_ids"][:, 0].tolist() for _, b in BatchPlan(rows, 3, 7, True, 0).iterate(0)]
    assert first == again
    assert sorted(sum(first, [])) == list(range(10))
    assert [b["input_ids"][:, 0].tolist() for _, b in plan.iterate(0, start=2)] == first[2:]
    assert first != [b["input_ids"][:, 0].tolist() for _, b in plan.iterate(1)]  # a new order each epoch
