"""lomo_core.evals: every task on the real stories260K model and the real SuperGLUE / LAMBADA / C4 files,
against lm-eval run directly and against log-likelihoods computed here with the model itself."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED, STORIES, need_shared

from lomo_core.evals import (
    METRICS,
    TASKS,
    EvalFileError,
    EvalInputError,
    EvalRequest,
    UnknownTaskError,
    check_eval_file,
    check_request,
    metric_in_range,
    read_eval_docs,
    task_config,
)

ROOT = Path(__file__).resolve().parents[2]
SUPERGLUE = SHARED / "data" / "superglue"
FOLDERS = {"boolq": "BoolQ", "cb": "CB", "copa": "COPA", "rte": "RTE", "wic": "WiC", "wsc": "WSC",
           "multirc": "MultiRC"}
C4 = SHARED / "data" / "text" / "c4_demo.jsonl"
WIKI = SHARED / "data" / "text" / "wiki_demo.txt"
LAMBADA = SHARED / "data" / "text" / "lambada_openai.jsonl"
LIMIT = 8
WINDOW = 256  # max_length of the shared runs: half the model's 512, to keep the file fast (the default is
# exercised by the few-shot, truncation and CLI tests)


def val(task: str) -> Path:
    return need_shared(SUPERGLUE / FOLDERS[task] / "val.jsonl")


def train(task: str) -> Path:
    return need_shared(SUPERGLUE / FOLDERS[task] / "train.jsonl")


def all_requests() -> list[EvalRequest]:
    return ([EvalRequest(task, val(task), limit=LIMIT) for task in FOLDERS]
            + [EvalRequest("perplexity", need_shared(C4), limit=LIMIT),
               EvalRequest("lambada", need_shared(LAMBADA), limit=LIMIT)])


def by_metric(scores) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for s in scores:
        table.setdefault(s.task, {})[s.metric] = s.value
    return table


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The model is tiny: one thread is as fast as two on an idle 2-core machine, and several times faster
    when other work shares the cores (two spinning OpenMP threads then wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stories():
    from lomo_core.evals import load_model

    return load_model(need_shared(STORIES))


@pytest.fixture(scope="module")
def run_all(stories):
    """Every task once (limit 8), with the progress callback recorded."""
    from lomo_core.evals import evaluate

    model, tokenizer = stories
    calls = []
    model.train()  # evaluate() must hand the model back in the mode it came in
    scores = evaluate(model, tokenizer, all_requests(), model_ref="base", max_length=WINDOW,
                      on_task=lambda *a: calls.append(a))
    assert model.training
    model.eval()
    return scores, calls


def direct_lm(stories, **kwargs):
    """lm-eval's own HFLM (not our counting subclass) around the same model."""
    import copy

    from lm_eval.models.huggingface import HFLM

    model, tokenizer = stories
    return HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=8, **kwargs)


def simple_evaluate(lm, configs, limit, **kwargs):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=configs, limit=limit, bootstrap_iters=0,
                                   task_manager=TaskManager(include_defaults=False), **kwargs)


# ------------------------------------------------------------------------------------------ every task
def test_every_task_produces_its_metrics_in_range(run_all):
    scores, calls = run_all
    table = by_metric(scores)
    assert set(table) == set(TASKS)
    for task, metrics in table.items():
        assert list(metrics) == METRICS[task], task
        for metric, value in metrics.items():
            assert metric_in_range(metric, value), (task, metric, value)
    for s in scores:
        assert s.examples == LIMIT, s
        assert s.split == "validation" and s.model_ref == "base"
        assert 0 <= s.truncated <= LIMIT
    # the model's own loss and perplexity agree: loss = log(token perplexity)
    assert table["perplexity"]["loss"] == pytest.approx(math.log(table["perplexity"]["token_perplexity"]), rel=1e-9)
    # progress: one call per task, in order, before it runs
    assert calls == [(r.task, i, len(calls)) for i, r in enumerate(all_requests())]


@pytest.fixture(scope="module")
def direct(stories, tmp_path_factory):
    """The same generated configs through lm_eval.simple_evaluate with lm-eval's plain HFLM (samples kept)."""
    from lomo_core.evals import token_counter

    lm = direct_lm(stories, max_length=WINDOW)
    folder = tmp_path_factory.mktemp("direct")
    merged: dict[str, dict] = {"results": {}, "n-samples": {}, "samples": {}}
    for r in all_requests():
        # one task a call, as evaluate() runs them: several tasks in one call share batches, and a different
        # padding of the same request moves the float sums in the 7th digit (seen on lambada's perplexity)
        results = simple_evaluate(lm, [task_config(r, folder / r.task, count_tokens=token_counter(lm))], LIMIT,
                                  log_samples=True)
        for key in merged:
            merged[key].update(results[key])
    return merged


def test_scores_equal_lm_eval_simple_evaluate(run_all, direct):
    scores, _ = run_all
    lm_eval_scores = {(name.removeprefix("lomo_"), key.split(",")[0]): value
                      for name, row in direct["results"].items() for key, value in row.items()
                      if key.endswith(",none") and "_stderr" not in key}
    ours = {(s.task, s.metric): s.value for s in scores}
    assert ours == lm_eval_scores  # exact: same model, same requests, same batching
    assert all(direct["n-samples"][f"lomo_{task}"]["effective"] == LIMIT for task in TASKS)


def test_prompts_are_lm_eval_builtin_superglue_prompts(tmp_path):
    """lm-eval's installed super_glue YAML (functions resolved), pointed at the same converted documents,
    builds request strings identical to ours; the gold target too, except MultiRC's (inverted there)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    from lomo_core.evals import prepare_offline

    prepare_offline()
    root = Path(lm_eval.__file__).parent / "tasks" / "super_glue"
    manager = TaskManager(include_defaults=False)
    for task in FOLDERS:
        ours = task_config(EvalRequest(task, val(task)), tmp_path / task)
        builtin = load_yaml(root / task / "default.yaml")
        builtin.pop("tag", None)
        builtin.pop("dataset_name", None)
        builtin.update(task=f"builtin_{task}", dataset_path="json", dataset_kwargs=ours["dataset_kwargs"],
                       training_split=None)
        a = manager.load([ours])["tasks"][f"lomo_{task}"]
        b = manager.load([builtin])["tasks"][f"builtin_{task}"]
        for t in (a, b):
            t.build_all_requests(limit=12, rank=0, world_size=1)
        assert [i.args for i in a.instances] == [i.args for i in b.instances], task
        docs = list(a.eval_docs)[:12]
        gold_ours = [a.doc_to_target(d) for d in docs]
        gold_builtin = [b.doc_to_target(d) for d in docs]
        if task == "multirc":
            # choices are [".. yes", ".. no"]: a correct answer (label 1) must have "yes" (0) as its gold
            assert gold_ours == [0 if d["label"] == 1 else 1 for d in docs]
            assert gold_builtin == [d["label"] for d in docs]
            assert 0 < sum(d["label"] for d in docs) < len(docs)  # both kinds of answer in the sample
        else:
            assert gold_ours == gold_builtin, task


def test_lambada_prompt_is_lm_eval_lambada_openai(tmp_path):
    """lambada_openai splits `text` into all-but-last word / " " + last word; our file gives the parts."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.utils import apply_template

    from lomo_core.evals.tasks import _lambada_target

    spec = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "lambada" / "lambada_openai.yaml")
    docs = read_eval_docs("lambada", need_shared(LAMBADA))[:50]
    for doc in docs:
        text = {"text": doc["context"] + " " + doc["continuation"]}
        assert apply_template(spec["doc_to_text"], text) == doc["context"]
        assert apply_template(spec["doc_to_target"], text) == _lambada_target(doc)


# --------------------------------------------------------------------------- an independent check: log-probs
def loglikelihood(model, tokenizer, context: str, continuation: str, max_length: int) -> float:
    """Sum of the log-probabilities of the continuation's tokens after the context, computed here: the
    tokens are split as lm-eval splits them (encode the whole, the continuation is what follows the
    context's tokens; the tokenizer adds BOS) and the input is cut from the left to max_length."""
    context_ids = tokenizer(context).input_ids
    whole = tokenizer(context + continuation).input_ids
    continuation_ids = whole[len(context_ids):]
    ids = (context_ids + continuation_ids)[-(max_length + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)[-len(continuation_ids):]
    return logprobs.gather(1, torch.tensor(continuation_ids)[:, None]).sum().item()


def raw_records(path: Path, n: int | None = None) -> list[dict]:
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in (lines[:n] if n else lines)]


def test_copa_and_multirc_against_loglikelihoods_computed_here(stories, run_all, direct):
    """Prompts written here from the raw SuperGLUE records (not with our module): the log-likelihoods lm-eval
    returns for our generated task match, and their argmax gives the accuracy / F1a / EM we reported."""
    model, tokenizer = stories
    scores = by_metric(run_all[0])

    # COPA: "premise without its period + because/therefore", choices lower-cased, after lm-eval's " " delimiter
    copa = raw_records(val("copa"), LIMIT)
    copa_lls = []
    for r in copa:
        context = r["premise"][:-1] + (" because" if r["question"] == "cause" else " therefore")
        copa_lls.append([loglikelihood(model, tokenizer, context, "  " + c[0].lower() + c[1:], WINDOW)
                         for c in (r["choice1"], r["choice2"])])
    # MultiRC: one (question, answer) pair per option, "yes" meaning the answer is correct
    options = []
    for line, r in enumerate(raw_records(val("multirc"), 3), start=1):
        for qi, q in enumerate(r["passage"]["questions"]):
            for a in q["answers"]:
                options.append((f"{line}.{qi}", r["passage"]["text"], q["question"], a["text"], a["label"]))
    options = options[:LIMIT]
    multirc_lls = []
    for _, paragraph, question, answer, _label in options:
        context = f"{paragraph}\nQuestion: {question}\nAnswer:"
        multirc_lls.append([loglikelihood(model, tokenizer, context, f" {answer}\nIs the answer correct? {yn}",
                                          WINDOW) for yn in ("yes", "no")])

    for name, mine in (("lomo_copa", copa_lls), ("lomo_multirc", multirc_lls)):
        samples = sorted(direct["samples"][name], key=lambda s: s["doc_id"])
        theirs = [[resp[0][0] for resp in s["resps"]] for s in samples]
        flat = [ll for lls in theirs for ll in lls]
        assert flat == pytest.approx([ll for lls in mine for ll in lls], rel=1e-4, abs=1e-4), name

    copa_acc = sum((lls[1] > lls[0]) == r["label"] for lls, r in zip(copa_lls, copa)) / len(copa)
    assert scores["copa"]["acc"] == pytest.approx(copa_acc, abs=1e-12)

    preds = [int(yes >= no) for yes, no in multirc_lls]
    golds = [o[4] for o in options]
    tp = sum(p and g for p, g in zip(preds, golds))
    fp = sum(p and not g for p, g in zip(preds, golds))
    fn = sum(g and not p for p, g in zip(preds, golds))
    questions: dict[str, bool] = {}
    for (qid, *_), p, g in zip(options, preds, golds):
        questions[qid] = questions.get(qid, True) and p == g
    assert scores["multirc"]["acc"] == pytest.approx(sum(p == g for p, g in zip(preds, golds)) / LIMIT, abs=1e-12)
    assert scores["multirc"]["f1a"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0, abs=1e-12)
    assert scores["multirc"]["em"] == pytest.approx(sum(questions.values()) / len(questions), abs=1e-12)


# ----------------------------------------------------------------------------------- few-shot, truncation
def test_fewshot_examples_come_from_the_train_file(stories, tmp_path):
    from lm_eval.tasks import TaskManager

    from lomo_core.evals import evaluate

    request = EvalRequest("boolq", val("boolq"), limit=LIMIT, num_fewshot=2, fewshot_file=train("boolq"))
    task = TaskManager(include_defaults=False).load([task_config(request, tmp_path / "cfg")])["tasks"]["lomo_boolq"]
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=2, rank=0, world_size=1)
    train_passages = [r["passage"] for r in raw_records(train("boolq"))]
    first = raw_records(val("boolq"), 1)[0]
    context = task.instances[0].args[0]
    assert context.count("\nAnswer:") == 3  # two solved examples, then the question
    assert sum(p in context for p in train_passages) == 2
    assert context.endswith(f"{first['passage']}\nQuestion: {first['question']}?\nAnswer:")
    assert any(context.count(f"Answer: {yn}\n\n") for yn in ("yes", "no"))  # examples carry their answers

    model, tokenizer = stories
    zero, two = (evaluate(model, tokenizer, [r], model_ref="base")[0] for r in
                 (EvalRequest("boolq", val("boolq"), limit=LIMIT), request))
    assert two.truncated > zero.truncated  # the examples make prompts longer than the 512-token window
    lm = direct_lm(stories)
    direct = simple_evaluate(lm, [task_config(request, tmp_path / "direct")], LIMIT)
    assert two.value == direct["results"]["lomo_boolq"]["acc,none"]


def test_truncation_is_counted(stories):
    """Count, independently, the BoolQ documents whose prompt + answer exceeds max_length + 1 tokens."""
    from lomo_core.evals import evaluate

    model, tokenizer = stories
    docs = raw_records(val("boolq"), LIMIT)
    lengths = [max(len(tokenizer(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer: {c}").input_ids)
                   for c in ("no", "yes")) for d in docs]
    for max_length in (64, 300, 4096):
        [score] = evaluate(model, tokenizer, [EvalRequest("boolq", val("boolq"), limit=LIMIT)], model_ref="base",
                           max_length=max_length)
        assert score.truncated == sum(n > max_length + 1 for n in lengths), max_length
        if max_length == 64:
            assert score.truncated == LIMIT
        if max_length == 300:
            assert 0 < score.truncated < LIMIT  # the count is per document, not all-or-nothing
        if max_length == 4096:
            assert score.truncated == 0


# ------------------------------------------------------------------------------------- checking the files
BOOLQ_OK = {"question": "is the sky blue", "passage": "The sky is blue.", "label": True}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_check_eval_file_names_every_bad_line_and_field(tmp_path):
    ok = json.dumps(BOOLQ_OK)
    missing = json.dumps({k: v for k, v in BOOLQ_OK.items() if k != "passage"})
    bad = write_lines(tmp_path / "val.jsonl", [ok, ok, '{"question": "x", ', ok, missing, ok])
    with pytest.raises(EvalFileError) as e:
        check_eval_file("boolq", bad)
    assert len(e.value.problems) == 2
    assert e.value.problems[0].startswith("val.jsonl line 3: invalid JSON")
    assert e.value.problems[1] == "val.jsonl line 5: field 'passage': missing"
    assert write_lines(tmp_path / "good.jsonl", [ok] * 4).exists()
    assert check_eval_file("boolq", tmp_path / "good.jsonl") == 4


def test_check_eval_file_types_labels_and_limits(tmp_path):
    rows = [
        {**BOOLQ_OK, "label": "yes"},  # 1: wrong type
        {k: v for k, v in BOOLQ_OK.items() if k != "label"},  # 2: unlabelled (a test split)
        {**BOOLQ_OK, "passage": 3},  # 3
        {**BOOLQ_OK, "label": 2},  # 4: out of range
        [1, 2],  # 5: not an object
    ] + [{**BOOLQ_OK, "question": None}] * 30  # 6..35
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(EvalFileError) as e:
        check_eval_file("boolq", path)
    p = e.value.problems
    assert p[0] == "t.jsonl line 1: field 'label': expected true/false or 0/1, got string"
    assert p[1].startswith("t.jsonl line 2: field 'label': missing") and "labels are needed" in p[1]
    assert p[2] == "t.jsonl line 3: field 'passage': expected a string, got integer"
    assert p[3] == "t.jsonl line 4: field 'label': 2 is out of range 0..1"
    assert p[4] == "t.jsonl line 5: expected a JSON object, got array"
    assert len(p) == 21 and p[-1] == "... and 15 more bad lines (35 in all)"  # 20 shown, then the rest counted

    cb = write_lines(tmp_path / "cb.jsonl", [json.dumps({"premise": "a", "hypothesis": "b", "label": "maybe"})])
    with pytest.raises(EvalFileError, match="'entailment', 'contradiction', 'neutral'"):
        check_eval_file("cb", cb)


def test_check_eval_file_multirc_nested_fields(tmp_path):
    def record(answers):
        return json.dumps({"passage": {"text": "P.", "questions": [{"question": "Q?", "answers": answers}]}})

    path = write_lines(tmp_path / "m.jsonl", [
        record([{"text": "a", "label": 1}, {"text": "b", "label": 0}]),
        record([{"text": "a", "label": 1}, {"text": "b"}]),
        json.dumps({"passage": {"text": "P.", "questions": []}}),
        json.dumps({"passage": "P."}),
    ])
    with pytest.raises(EvalFileError) as e:
        check_eval_file("multirc", path)
    assert e.value.problems[0].startswith("m.jsonl line 2: field 'passage.questions[0].answers[1].label': missing")
    assert e.value.problems[1] == "m.jsonl line 3: field 'passage.questions': expected a non-empty array, got array"
    assert e.value.problems[2] == "m.jsonl line 4: field 'passage': expected an object, got string"
    good = write_lines(tmp_path / "ok.jsonl", [record([{"text": "a", "label": 1}, {"text": "b", "label": False}])])
    assert check_eval_file("multirc", good) == 1
    docs = read_eval_docs("multirc", good)
    assert [(d["answer"], d["label"], d["question_id"]) for d in docs] == [("a", 1, "1.0"), ("b", 0, "1.0")]


def test_shared_files_are_valid_and_converted():
    counts = {task: check_eval_file(task, val(task)) for task in FOLDERS}
    assert counts == {"boolq": 3270, "cb": 56, "copa": 100, "rte": 277, "wic": 638, "wsc": 104, "multirc": 83}
    assert len(read_eval_docs("multirc", val("multirc"))) == 4848  # answer options
    assert check_eval_file("perplexity", need_shared(WIKI)) == 30  # one article a line
    assert check_eval_file("perplexity", need_shared(C4)) == 300
    assert check_eval_file("lambada", need_shared(LAMBADA)) == 5153
    cb = read_eval_docs("cb", val("cb"))[:2]  # original string labels -> the Hub's ClassLabel order
    assert [d["label"] for d in cb] == [1, 2]  # contradiction, neutral
    wsc = read_eval_docs("wsc", val("wsc"))[0]
    assert (wsc["span2_index"], wsc["span2_text"], wsc["label"]) == (47, "him", 0)


def test_unknown_task_and_bad_requests():
    with pytest.raises(UnknownTaskError) as e:
        check_eval_file("hellaswag", "whatever.jsonl")
    assert "'hellaswag'" in str(e.value)
    assert "known tasks: boolq, cb, copa, rte, wic, wsc, multirc, perplexity, lambada" in str(e.value)
    with pytest.raises(EvalFileError, match="no such file"):
        check_eval_file("cb", "/no/such/file.jsonl")
    with pytest.raises(EvalInputError, match="fewshot_file"):
        check_request(EvalRequest("cb", val("cb"), num_fewshot=2))
    with pytest.raises(EvalInputError, match="limit"):
        check_request(EvalRequest("cb", val("cb"), limit=0))
    with pytest.raises(EvalInputError, match="perplexity"):
        check_request(EvalRequest("perplexity", need_shared(C4), num_fewshot=1, fewshot_file=need_shared(C4)))


def run_python(code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_checking_imports_neither_torch_nor_lm_eval(tmp_path):
    path = write_lines(tmp_path / "v.jsonl", [json.dumps(BOOLQ_OK)] * 3)
    out = run_python(
        "import sys\nfrom lomo_core.evals import check_eval_file, check_request, EvalRequest\n"
        f"n = check_eval_file('boolq', {str(path)!r}) + check_request(EvalRequest('boolq', {str(path)!r}))\n"
        "print(n, sorted(m for m in ('torch', 'lm_eval', 'transformers', 'datasets') if m in sys.modules))")
    assert out == "6 []"


def test_unknown_task_is_refused_before_lm_eval_and_the_hub_is_off():
    out = run_python(
        "import sys\nfrom lomo_core.evals import EvalRequest, UnknownTaskError, evaluate\n"
        "try:\n    evaluate(object(), object(), [EvalRequest('hellaswag', 'x.jsonl')], model_ref='m')\n"
        "except UnknownTaskError as e:\n    print('refused', e.task, 'lm_eval' in sys.modules)\n")
    assert out == "refused hellaswag False"
    # what lm-eval would do with a Hub dataset: after prepare_offline(), datasets refuses at once
    out = run_python(
        "import time\nfrom lomo_core.evals import prepare_offline\nprepare_offline()\nimport datasets\n"
        "t = time.time()\ntry:\n    datasets.load_dataset('aps/super_glue', 'boolq')\n    print('loaded')\n"
        "except Exception as e:\n    print(type(e).__name__, 'OfflineModeIsEnabled' in str(e), time.time() - t < 5)")
    assert out == "ConnectionError True True"


# ----------------------------------------------------------------------------------------------- the CLI
def cli(*args: str):
    from typer.testing import CliRunner

    from client.cli import app

    return CliRunner().invoke(app, ["eval", *args])


def test_cli_eval_prints_metrics_and_json():
    common = ["--model", str(need_shared(STORIES)), "--task", "cb", "--file", str(val("cb")), "--limit", "4"]
    table = cli(*common)
    assert table.exit_code == 0, table.output
    assert "acc" in table.output and "f1" in table.output and "│ cb" in table.output
    as_json = cli(*common, "--json")
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout[as_json.stdout.index("["):])
    assert [(r["task"], r["metric"], r["examples"]) for r in rows] == [("cb", "acc", 4), ("cb", "f1", 4)]
    assert all(0 <= r["value"] <= 1 for r in rows)


def test_cli_eval_bad_input_exits_2_with_the_option(tmp_path):
    model = str(need_shared(STORIES))
    bad_task = cli("--model", model, "--task", "hellaswag", "--file", str(val("cb")))
    assert bad_task.exit_code == 2 and "--task: unknown task 'hellaswag'" in bad_task.output
    assert "Traceback" not in bad_task.output
    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps(BOOLQ_OK), "{not json"])
    bad_file = cli("--model", model, "--task", "boolq", "--file", str(bad))
    assert bad_file.exit_code == 2 and "--file: bad.jsonl line 2: invalid JSON" in bad_file.output
    no_model = cli("--model", str(tmp_path / "none"), "--task", "boolq", "--file", str(bad))
    assert no_model.exit_code == 2 and "--model:" in no_model.output
    shots = cli("--model", model, "--task", "cb", "--file", str(val("cb")), "--num-fewshot", "2")
    assert shots.exit_code == 2 and "--num-fewshot: few-shot examples need a fewshot_file" in shots.output
