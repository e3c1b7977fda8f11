"""Data loading: formats, loss masking, packing, deterministic order, line-numbered errors."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED, STORIES, need_shared

from lomo_core.data import (
    IGNORE_INDEX,
    BatchPlan,
    DataError,
    Example,
    check_file,
    collate,
    detect_format,
    load_examples,
    pack_examples,
    tokenize_record,
)

GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2" / "tokenizer.json"
# A ChatML-like template that also shows a message's ``weight`` when it is handed one, as templates that
# render every key do: the data module must not let it through.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}{% if m.weight is defined %} weight={{ m.weight }}{% endif %}"
    "{{ '\\n' }}{{ m.content }}<|im_end|>{{ '\\n' }}{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(need_shared(STORIES))


@pytest.fixture(scope="module")
def chat_tokenizer():
    """GPT-2's tokenizer with a chat template and an EOS token but no BOS token."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(need_shared(GPT2_TOKENIZER)), eos_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def expected_labels(tokenizer, segments):
    """What ``tokenize_record`` must make of ``(text, trained)`` segments: BOS (not trained) when the
    tokenizer has one, each segment tokenized on its own and trained or masked, EOS (trained)."""
    ids, labels = [], []
    if tokenizer.bos_token_id is not None:
        ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    for text, trained in segments:
        seg = tokenizer(text, add_special_tokens=False).input_ids
        ids += seg
        labels += seg if trained else [IGNORE_INDEX] * len(seg)
    return ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX])


def user(content):
    return {"role": "user", "content": content}


def assistant(content, **extra):
    return {"role": "assistant", "content": content, **extra}


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


# ---------------------------------------------------------------------------------------------- OpenAI formats
def test_prompt_completion_trains_only_the_completion(tmp_path, tokenizer):
    rows = [{"prompt": "Tom had a ball.\n\n###\n\n", "completion": " He threw it far. END"},
            {"prompt": "The sun", "completion": " was warm."}]
    data = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, 64)
    assert data.format == "instruct" and len(data.examples) == 2
    for row, ex in zip(rows, data.examples):
        ids, labels = expected_labels(tokenizer, [(row["prompt"], False), (row["completion"], True)])
        assert (ex.input_ids, ex.labels) == (ids, labels)
    assert trained_text(tokenizer, data.examples[0]) == "He threw it far. END</s>"


def test_detect_format_reads_completion_rows_as_instruction_data(tmp_path):
    assert detect_format({"text": "a story"}) == "text"
    assert detect_format({"text": "a story", "completion": "the end"}) == "instruct"
    assert detect_format({"prompt": "a", "completion": "b"}) == "instruct"
    check = check_file(write_jsonl(tmp_path / "d.jsonl", [{"text": "a story", "completion": "the end"}]))
    assert check.format == "instruct" and check.errors == [(1, "missing field 'prompt'")]


# Records check_file must refuse, with the reason it gives (without the line number).
REFUSED = [
    ({"prompt": "a"}, "missing field 'response' (or 'completion')"),
    ({"completion": "b"}, "missing field 'prompt'"),
    ({"prompt": "a", "completion": ""}, "field 'completion' is empty"),
    ({"prompt": "a", "completion": " \n"}, "field 'completion' is empty"),
    ({"prompt": "a", "completion": 7}, "field 'completion' must be a string, got int"),
    ({"prompt": "a", "completion": None}, "field 'completion' must be a string, got NoneType"),
    ({"prompt": "a", "completion": "b", "response": "c"}, "both 'completion' and 'response' are given; keep one"),
    ({"messages": [user("hi"), assistant("yo", weight=2)]}, "messages[1].weight must be 0 or 1, got 2"),
    ({"messages": [user("hi"), assistant("yo", weight=True)]}, "messages[1].weight must be 0 or 1, got true"),
    ({"messages": [user("hi"), assistant("yo", weight=1.0)]}, "messages[1].weight must be 0 or 1, got 1.0"),
    ({"messages": [user("hi"), assistant("yo", weight="1")]}, 'messages[1].weight must be 0 or 1, got "1"'),
    ({"messages": [user("hi"), assistant("yo", weight=None)]}, "messages[1].weight must be 0 or 1, got null"),
    ({"messages": [{**user("hi"), "weight": 1}, assistant("yo")]},
     "messages[0].weight is only allowed on assistant messages, not 'user'"),
    ({"messages": [{"role": "system", "content": "s", "weight": 0}, user("hi"), assistant("yo")]},
     "messages[0].weight is only allowed on assistant messages, not 'system'"),
    ({"messages": [user("hi"), assistant("yo", weight=0), user("ok"), assistant("bye", weight=0)]},
     "no non-empty assistant message to learn from: those there have weight 0"),
    ({"messages": [user("hi"), assistant("yo", weight=0), assistant(" ")]},
     "no non-empty assistant message to learn from: those there have weight 0"),
    ({"messages": [user("hi")]}, "no non-empty assistant message to learn from"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "messages": [user("hi"), assistant("yo")]},
     "function calling ('tools') is not supported for training yet; remove the tools or the row"),
    ({"functions": [{"name": "f"}], "messages": [user("hi"), assistant("yo")]},
     "function calling ('functions') is not supported for training yet; remove the tools or the row"),
    ({"tools": [{"type": "function"}], "prompt": "a", "completion": "b"},
     "function calling ('tools') is not supported for training yet; remove the tools or the row"),
    ({"messages": [user("hi"), assistant(None, tool_calls=[{"id": "c1", "type": "function"}])]},
     "function calling (messages[1].tool_calls) is not supported for training yet; remove the tools or the row"),
    ({"messages": [user("hi"), assistant(None, function_call={"name": "f", "arguments": "{}"})]},
     "function calling (messages[1].function_call) is not supported for training yet; remove the tools or the row"),
    ({"messages": [user("hi"), {"role": "tool", "content": "42", "tool_call_id": "c1"}, assistant("42")]},
     "function calling (messages[1] has role 'tool') is not supported for training yet; remove the tools or the row"),
    ({"messages": [user("hi"), {"role": "function", "name": "f", "content": "42"}, assistant("42")]},
     "function calling (messages[1] has role 'function') is not supported for training yet; remove the tools or "
     "the row"),
    ({"messages": [{"role": "developer", "content": "d"}, assistant("yo")]},
     "messages[0].role 'developer' is not system/user/assistant"),
    ({"messages": [user([{"type": "text", "text": "what is this?"},
                         {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]),
                   assistant("a cat")]},
     "messages[0].content[1] has type 'image_url': only text parts can be trained"),
    ({"messages": [user([{"text": "untyped"}]), assistant("yo")]},
     'messages[0].content[0] must be {"type": "text", "text": <string>}'),
    ({"messages": [user([{"type": "text", "text": 3}]), assistant("yo")]},
     'messages[0].content[0] must be {"type": "text", "text": <string>}'),
    ({"messages": [user("hi"), assistant(None)]},
     "messages[1].content must be a string or a list of text parts, got null"),
    ({"messages": [user("hi"), {"role": "assistant"}]},
     "messages[1].content must be a string or a list of text parts, got null"),
    ({"messages": [user("hi"), assistant({"text": "yo"})]},
     "messages[1].content must be a string or a list of text parts, got dict"),
    ({"messages": [{"content": "hi"}, assistant("yo")]}, "messages[0] must be an object with a string 'role'"),
    ({"messages": []}, "'messages' must be a non-empty list"),
]
# Records check_file must accept (each has something to learn from).
ACCEPTED = [
    {"prompt": "a", "completion": " b"},
    {"prompt": "a", "response": "b"},
    {"messages": [user("hi"), assistant("yo", weight=0), user("again"), assistant("yo yo", weight=1)]},
    {"messages": [{"role": "system", "content": "Be brief."}, user([{"type": "text", "text": "hi"}]), assistant("yo")]},
    {"tools": [], "functions": None, "messages": [user("hi"), assistant("yo", tool_calls=None, function_call=None)]},
]


@pytest.mark.parametrize("record, message", REFUSED)
def test_check_file_names_the_line_and_the_reason(tmp_path, record, message):
    good = {"messages": [user("hi"), assistant("yo")]} if "messages" in record else {"prompt": "p", "completion": "c"}
    check = check_file(write_jsonl(tmp_path / "d.jsonl", [good, good, record, good]))
    assert check.records == 4 and check.format == "instruct"
    assert check.errors == [(3, message)]


@pytest.mark.parametrize("record", [*ACCEPTED, *(record for record, _ in REFUSED)])
def test_check_file_and_tokenize_record_agree(tmp_path, tokenizer, chat_tokenizer, record):
    f = write_jsonl(tmp_path / "d.jsonl", [record])
    errors = check_file(f).errors
    for tok in (tokenizer, chat_tokenizer):
        if not errors:
            ex = tokenize_record(record, "instruct", tok, 10**9, where=f"{f}:1")
            assert any(lab != IGNORE_INDEX for lab in ex.labels[:-1])  # more than the EOS is trained
        else:
            ((line, message),) = errors
            with pytest.raises(DataError) as caught:
                tokenize_record(record, "instruct", tok, 10**9, where=f"{f}:1")
            assert line == 1 and str(caught.value) == f"{f}:1: {message}"


CHAT = [
    {"role": "system", "content": "Be brief."},
    user("hello"),
    assistant("hi there", weight=0),
    user("how are you?"),
    assistant("fine"),
    user("bye"),
    assistant("bye now", weight=1),
]


def test_chat_weights_mask_exactly_with_the_fallback_template(tokenizer):
    record = {"messages": json.loads(json.dumps(CHAT))}
    ex = tokenize_record(record, "instruct", tokenizer, 10**9, where="d.jsonl:1")
    segments = [(f"<|{m['role']}|>\n{m['content']}\n", m["role"] == "assistant" and m.get("weight", 1) == 1)
                for m in CHAT]
    assert (ex.input_ids, ex.labels) == expected_labels(tokenizer, segments)
    trained = trained_text(tokenizer, ex)
    assert "fine" in trained and "bye now" in trained
    assert "hi there" not in trained and "hello" not in trained and "Be brief" not in trained
    assert "weight" not in tokenizer.decode(ex.input_ids)
    assert record == {"messages": CHAT}  # the record is read, not changed


def test_chat_weights_mask_exactly_with_a_chat_template(chat_tokenizer):
    ex = tokenize_record({"messages": CHAT}, "instruct", chat_tokenizer, 10**9, where="d.jsonl:1")
    segments = [(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n",
                 m["role"] == "assistant" and m.get("weight", 1) == 1) for m in CHAT]
    assert (ex.input_ids, ex.labels) == expected_labels(chat_tokenizer, segments)
    assert "weight" not in chat_tokenizer.decode(ex.input_ids)
    assert trained_text(chat_tokenizer, ex) == (
        "<|im_start|>assistant\nfine<|im_end|>\n<|im_start|>assistant\nbye now<|im_end|>\n<|endoftext|>"
    )


def test_weight_one_is_the_default_and_weight_zero_masks_the_turn(tokenizer, chat_tokenizer):
    plain = [user("hello"), assistant("hi there"), user("bye"), assistant("bye now")]
    ones = [user("hello"), assistant("hi there", weight=1), user("bye"), assistant("bye now", weight=1)]
    first_off = [user("hello"), assistant("hi there", weight=0), user("bye"), assistant("bye now")]
    for tok in (tokenizer, chat_tokenizer):
        a, b, c = (tokenize_record({"messages": m}, "instruct", tok, 10**9, "x") for m in (plain, ones, first_off))
        assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
        assert c.input_ids == a.input_ids  # weight 0 changes the mask, never the text
        changed = [i for i, (x, y) in enumerate(zip(a.labels, c.labels)) if x != y]
        assert changed and all(c.labels[i] == IGNORE_INDEX for i in changed)
        assert "hi there" in tok.decode([a.input_ids[i] for i in changed])
        assert "hi there" not in trained_text(tok, c) and "bye now" in trained_text(tok, c)


def test_chat_text_parts_are_joined_like_a_string(tokenizer, chat_tokenizer):
    parts = {"messages": [user([{"type": "text", "text": "Look "}, {"type": "text", "text": "here."}]),
                          assistant([{"type": "text", "text": "I see it."}])]}
    string = {"messages": [user("Look here."), assistant("I see it.")]}
    for tok in (tokenizer, chat_tokenizer):
        a = tokenize_record(parts, "instruct", tok, 10**9, "x")
        b = tokenize_record(string, "instruct", tok, 10**9, "x")
        assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
        assert "I see it." in trained_text(tok, a) and "Look" not in trained_text(tok, a)


def test_chat_template_errors_name_the_line(chat_tokenizer):
    from transformers import PreTrainedTokenizerFast

    strict = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER), eos_token="<|endoftext|>")
    strict.chat_template = "{% if messages[0].role != 'system' %}{{ raise_exception('no system message') }}{% endif %}"
    with pytest.raises(DataError, match=r"^d.jsonl:4: the chat template refused the messages: no system message$"):
        tokenize_record({"messages": [user("hi"), assistant("yo")]}, "instruct", strict, 64, "d.jsonl:4")


def test_load_examples_trains_an_openai_chat_file(tmp_path, chat_tokenizer):
    rows = [{"messages": CHAT}, {"messages": [user("hi"), assistant("yo", weight=0), assistant("ok")]}]
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert check_file(f).ok
    data = load_examples(f, chat_tokenizer, 256)
    assert data.format == "instruct" and len(data.examples) == 2
    assert trained_text(chat_tokenizer, data.examples[1]) == "<|im_start|>assistant\nok<|im_end|>\n<|endoftext|>"
