"""The worker's job runner without Celery: a real training child on stories260K, and children that misbehave."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from jobs import errors, files, lifecycle, results
from jobs.db import database
from jobs.migrate import upgrade
from jobs.models import Checkpoint, EvalResult, GpuLease, Job, MemorySample, MetricPoint
from jobs.schemas import JobCreate
from jobs.settings import Settings
from tests.conftest import INSTRUCT, STORIES, need_shared
from worker.supervisor import JobRunner


@pytest.fixture
def env(tmp_path):
    url = f"sqlite:///{tmp_path / 'lomo.db'}"
    upgrade(url)
    settings = Settings(data_dir=tmp_path / "var", database_url=url, flush_interval_s=0.2, cancel_grace_s=1.0,
                        device="cpu")
    return settings, database(url)


def submit(settings, db, model, data_path=None, content=None, gpus=None, priority=0, evals=None, **hyper) -> str:
    upload = settings.data_dir / "up.part"
    upload.parent.mkdir(parents=True, exist_ok=True)
    if data_path is not None:
        shutil.copy(data_path, upload)
    else:
        upload.write_text(content)
    name = data_path.name if data_path is not None else "d.jsonl"
    model = Path(model)
    if model.parent not in settings.model_dirs:  # jobs name registered models: the folder's parent is one
        settings.model_dirs.append(model.parent)
    with db.session() as s:
        row = files.store_file(s, settings, "ann", name, "fine-tune", upload)
        job = lifecycle.create_job(s, settings, "ann", JobCreate(model=model.name, training_file=row.id,
                                                               hyperparameters=hyper, gpus=gpus,
                                                               priority=priority, evals=evals or []))
    return job.id


def store_eval_file(settings, db, path) -> str:
    upload = settings.data_dir / "up.part"
    upload.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, upload)
    with db.session() as s:
        return files.store_file(s, settings, "ann", path.name, "eval", upload).id


COPA = STORIES.parents[1] / "data" / "superglue" / "COPA" / "val.jsonl"


def job_row(db, job_id) -> Job:
    with db.session() as s:
        return s.get(Job, job_id)


def test_a_job_runs_and_everything_it_reports_is_stored(env):
    settings, db = env
    job_id = submit(settings, db, need_shared(STORIES), need_shared(INSTRUCT), max_steps=6, batch_size=4,
                    max_seq_len=64, lr=5e-3, validation_split=0.02, eval_every=3, save_every=3)
    assert JobRunner(settings, db).run(job_id) == "succeeded"
    job = job_row(db, job_id)
    assert (job.status, job.step, job.total_steps, job.attempt) == ("succeeded", 6, 6, 1)
    assert job.trained_tokens > 0 and job.error_code is None
    assert (settings.data_dir / "jobs" / job_id / "model" / "config.json").is_file()
    assert job.fine_tuned_model == f"ft:{STORIES.name}::{job_id}"  # a name; the folder is the job's "model"
    with db.session() as s:
        train = s.query(MetricPoint).filter_by(job_id=job_id, kind="train").order_by(MetricPoint.step).all()
        assert [p.step for p in train] == [1, 2, 3, 4, 5, 6] and all(p.tokens_per_s > 0 for p in train)
        assert [p.step for p in s.query(MetricPoint).filter_by(job_id=job_id, kind="val")] == [0, 3, 6]
        assert s.query(MemorySample).filter_by(job_id=job_id).first().peak_bytes > 0
        assert [c.step for c in s.query(Checkpoint).filter_by(job_id=job_id).order_by(Checkpoint.step)] == [3, 6]
        evals = {(e.model_ref, e.metric): e.value for e in s.query(EvalResult).filter_by(job_id=job_id)}
        assert evals[("fine_tuned", "loss")] < evals[("base", "loss")]  # fine-tuning lowered the held-out loss
    # a second delivery of the same job does nothing
    assert JobRunner(settings, db).run(job_id) == "skipped"
    assert job_row(db, job_id).attempt == 1


def test_a_missing_model_folder_fails_with_a_clear_message(env, tmp_path):
    settings, db = env
    model = tmp_path / "model-copy"
    shutil.copytree(need_shared(STORIES), model)
    job_id = submit(settings, db, model, need_shared(INSTRUCT), max_steps=2)
    shutil.rmtree(model)  # gone between submission and the run
    assert JobRunner(settings, db).run(job_id) == "failed"
    job = job_row(db, job_id)
    assert (job.error_code, job.error_param) == ("model_not_found", "model")
    assert "model-copy" in job.error_message and "config.json" in job.error_message
    assert str(tmp_path) not in job.error_message  # named, but no path of the node


def test_data_that_cannot_train_fails_naming_the_file_and_the_fix(env):
    settings, db = env
    long_prompt = '{"prompt": "' + "word " * 200 + '", "response": "short"}\n'
    job_id = submit(settings, db, need_shared(STORIES), content=long_prompt * 3, max_seq_len=16)
    assert JobRunner(settings, db).run(job_id) == "failed"
    job = job_row(db, job_id)
    assert job.error_code == "invalid_training_file" and job.error_param == "training_file"
    assert "max_seq_len=16" in job.error_message and job.training_file_id in job.error_message
    assert str(settings.data_dir) not in job.error_message  # the user's file id, not the node's path


def test_a_diverging_run_fails_with_nan_loss(env):
    settings, db = env
    job_id = submit(settings, db, need_shared(STORIES), need_shared(INSTRUCT), max_steps=20, batch_size=2,
                    max_seq_len=128, lr=1e9)
    assert JobRunner(settings, db).run(job_id) == "failed"
    job = job_row(db, job_id)
    assert job.error_code == "nan_loss" and "lower lr" in job.error_message


STUBBORN = """
import json, os, signal, sys, time
fd = int(sys.argv[sys.argv.index("--fd") + 1])
def emit(kind, step, payload):
    os.write(fd, (json.dumps({"kind": kind, "step": step, "payload": payload}) + "\\n").encode())
emit("start", 0, {"total_steps": 1000, "step": 0})
MODE = sys.argv[1]
if MODE == "report-devices":  # writes which GPUs it was given beside its config
    emit("train", 1, {"loss": 1.0, "lr": 0.1, "tokens": 1, "tokens_per_s": 1.0})
    with open(os.path.join(os.path.dirname(sys.argv[2]), "devices.txt"), "w") as f:
        f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "none"))
    emit("done", 1, {"model_dir": "model", "steps": 1})
    sys.exit(0)
if MODE == "oom":
    emit("error", 0, {"code": "out_of_memory", "message": "out of GPU memory: CUDA out of memory; lower batch_size",
                      "field": None})
    sys.exit(1)
if MODE == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if MODE == "crash":  # a bug: the traceback names source files and the job's folder
    raise RuntimeError("cannot open " + os.path.join(os.path.dirname(sys.argv[2]), "weights.bin"))
for step in range(1, 1000):
    emit("train", step, {"loss": 1.0, "lr": 0.1, "tokens": 1, "tokens_per_s": 1.0})
    if MODE == "die" and step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
"""


def stub_runner(settings, db, tmp_path, mode: str) -> JobRunner:
    script = tmp_path / "stub.py"
    script.write_text(textwrap.dedent(STUBBORN))
    return JobRunner(settings, db, command=[sys.executable, str(script), mode])


def test_a_child_that_ignores_cancellation_is_killed(env, tmp_path, tiny_model_dir):
    settings, db = env
    job_id = submit(settings, db, tiny_model_dir, content='{"prompt": "a", "response": "b"}\n')
    runner = stub_runner(settings, db, tmp_path, "ignore-term")
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run(job_id)))
    thread.start()
    deadline = time.monotonic() + 30
    while job_row(db, job_id).step < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    with db.session() as s:
        lifecycle.cancel_job(s, "ann", job_id)
    thread.join(timeout=30)
    assert outcome == ["cancelled"]
    with db.session() as s:
        events, _ = results.list_events(s, "ann", job_id, limit=100)
    assert any("killed after the grace period" in e.message for e in events)


def test_a_crash_is_reported_with_the_log_tail_and_no_path_of_the_node(env, tmp_path, tiny_model_dir):
    settings, db = env
    job_id = submit(settings, db, tiny_model_dir, content='{"prompt": "a", "response": "b"}\n')
    assert stub_runner(settings, db, tmp_path, "crash").run(job_id) == "failed"
    job = job_row(db, job_id)
    assert job.error_code == "internal_error" and "RuntimeError: cannot open .../weights.bin" in job.error_message
    assert str(tmp_path) not in job.error_message and 'File ".../stub.py"' in job.error_message


def test_a_child_killed_by_the_system_fails_the_job_with_the_likely_cause(env, tmp_path, tiny_model_dir):
    settings, db = env
    job_id = submit(settings, db, tiny_model_dir, content='{"prompt": "a", "response": "b"}\n')
    assert stub_runner(settings, db, tmp_path, "die").run(job_id) == "failed"
    job = job_row(db, job_id)
    assert job.error_code == "process_killed" and "SIGKILL" in job.error_message
    assert "out of memory" in job.error_message and job.step == 3


def test_a_job_on_two_ranks_runs_through_the_launcher_and_stores_each_ranks_memory(env):
    settings, db = env
    copa = store_eval_file(settings, db, need_shared(COPA))
    job_id = submit(settings, db, need_shared(STORIES), need_shared(INSTRUCT), gpus=2, max_steps=4, batch_size=4,
                    max_seq_len=64, lr=5e-3, validation_split=0.02, save_every=2,
                    evals=[{"task": "copa", "file": copa, "limit": 4}])
    assert JobRunner(settings, db).run(job_id) == "succeeded"
    job = job_row(db, job_id)
    assert (job.gpus, job.step, job.total_steps) == (2, 4, 4) and job.trained_tokens > 0
    assert (settings.data_dir / "jobs" / job_id / "model" / "model.safetensors").is_file()
    with db.session() as s:
        ranks = sorted({m.rank for m in s.query(MemorySample).filter_by(job_id=job_id)})
        assert ranks == [0, 1]
        assert [p.step for p in s.query(MetricPoint).filter_by(job_id=job_id, kind="train")
                .order_by(MetricPoint.step)] == [1, 2, 3, 4]
        assert [c.step for c in s.query(Checkpoint).filter_by(job_id=job_id).order_by(Checkpoint.step)] == [2, 4]
        summary = results.memory_summary(s, "ann", job_id)
    assert [m["rank"] for m in summary["measured"]] == [0, 1]
    assert summary["predicted"]["available"] is True
    with db.session() as s:  # scored in a spawned process, before the ranks start and after they end
        rows = s.query(EvalResult).filter_by(job_id=job_id, task="copa").all()
        scored = {(e.model_ref, e.metric): e.examples for e in rows}
    assert scored == {("base", "acc"): 4, ("fine_tuned", "acc"): 4}


def test_a_job_leases_its_gpus_waits_when_too_few_are_free_and_gives_them_back(env, tmp_path, tiny_model_dir):
    from jobs import leases

    settings, db = env
    settings = settings.model_copy(update={"gpu_memory_gib": [24.0, 24.0, 24.0], "requeue_delay_s": 60})
    first = submit(settings, db, tiny_model_dir, content='{"prompt": "a", "response": "b"}\n', gpus=2)
    second = submit(settings, db, tiny_model_dir, content='{"prompt": "a", "response": "b"}\n', gpus=2)
    # the first job holds GPUs 0 and 1 (as if it were running on another worker)
    with db.session() as s:
        assert lifecycle.claim(s, first, "elsewhere")
    with db.session() as s:
        s.add_all([GpuLease(node=settings.worker_name, device_index=i, job_id=first) for i in (0, 1)])
    runner = stub_runner(settings, db, tmp_path, "report-devices")
    assert runner.run(second) == "waiting"  # 1 of 3 free: it waits in the queue, never claimed
    job = job_row(db, second)
    assert job.status == "queued" and job.attempt == 0
    with db.session() as s:
        events, _ = results.list_events(s, "ann", second, limit=100)
    assert any("waiting: 2 GPU(s) needed, 1 of 3 free" in e.message for e in events)
    with db.session() as s:
        leases.release(s, first)
    assert runner.run(second) == "succeeded"  # now it starts, on the GPUs it was leased
    job = job_row(db, second)
    assert (settings.data_dir / "jobs" / second / "devices.txt").read_text() == "0,1" and job.attempt == 1
    with db.session() as s:
        assert leases.leased_devices(s, settings.worker_name) == {}  # given back at the end


def test_out_of_memory_fails_with_the_prediction_and_the_device_and_frees_the_gpus(env, tmp_path, tiny_model_dir):
    from jobs import leases

    settings, db = env
    settings = settings.model_copy(update={"gpu_memory_gib": [24.0, 24.0]})
    job_id = submit(settings, db, tiny_model_dir, content='{"prompt": "a", "response": "b"}\n')
    assert stub_runner(settings, db, tmp_path, "oom").run(job_id) == "failed"
    job = job_row(db, job_id)
    assert job.error_code == "out_of_memory" and "lower batch_size" in job.error_message
    assert "GiB per device on 1 cuda device(s) of 24.00 GiB each" in job.error_message
    with db.session() as s:
        assert leases.leased_devices(s, settings.worker_name) == {}


def test_the_queue_runs_higher_priority_first_then_first_come(env, tmp_path, tiny_model_dir):
    settings, db = env
    row = '{"prompt": "a", "response": "b"}\n'
    low = submit(settings, db, tiny_model_dir, content=row, priority=0)
    high_first = submit(settings, db, tiny_model_dir, content=row, priority=5)
    high_second = submit(settings, db, tiny_model_dir, content=row, priority=5)
    runner = stub_runner(settings, db, tmp_path, "report-devices")
    # every message is the low job's: the queue's order decides what runs
    assert [runner.run(low) for _ in range(4)] == ["succeeded", "succeeded", "succeeded", "skipped"]
    started = sorted((job_row(db, j).started_at, j) for j in (low, high_first, high_second))
    assert [j for _, j in started] == [high_first, high_second, low]
    assert all(job_row(db, j).attempt == 1 for j in (low, high_first, high_second))


def test_a_job_with_evaluations_scores_the_base_and_the_fine_tuned_model(env, tmp_path):
    """Trained on a small learnable text, the held-out loss of that text falls; a SuperGLUE task (COPA)
    is scored on both models, and the base model's score is what lm-eval gives run directly."""
    import copy

    from lomo_core.evals import EvalRequest, load_model, prepare_offline, task_config, token_counter

    settings, db = env
    copa = need_shared(COPA)
    lines = [f"the {c} sat on the {m}." for c in ("cat", "dog", "hen", "fox") for m in ("mat", "rug", "bed")]
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(f"the {c} sat on the mat." for c in ("owl", "pig", "cow", "ram")) + "\n")

    text_id, copa_id = store_eval_file(settings, db, held_out), store_eval_file(settings, db, copa)
    job_id = submit(settings, db, need_shared(STORIES), content="".join(json.dumps({"text": line}) + "\n"
                                                                         for line in lines * 4),
                    max_steps=12, batch_size=8, max_seq_len=32, lr=2e-2, save_every=6,
                    evals=[{"task": "perplexity", "file": text_id, "at_checkpoints": True},
                           {"task": "copa", "file": copa_id, "limit": 6}])
    assert JobRunner(settings, db).run(job_id) == "succeeded", job_row(db, job_id).error_message
    with db.session() as s:
        rows = s.query(EvalResult).filter_by(job_id=job_id).all()
        events, _ = results.list_events(s, "ann", job_id, limit=200)
    scores = {(r.task, r.metric, r.model_ref): r for r in rows}
    assert scores[("perplexity", "loss", "fine_tuned")].value < scores[("perplexity", "loss", "base")].value
    assert scores[("perplexity", "loss", "base")].examples == 4
    assert scores[("copa", "acc", "base")].examples == 6 and scores[("copa", "acc", "fine_tuned")].examples == 6
    # at each checkpoint, on the weights in memory: the last one is the fine-tuned model itself
    assert {ref for _, _, ref in scores} == {"base", "checkpoint-6", "checkpoint-12", "fine_tuned"}
    assert not any(task == "copa" and ref.startswith("checkpoint") for task, _, ref in scores)
    assert scores[("perplexity", "loss", "checkpoint-12")].value == pytest.approx(
        scores[("perplexity", "loss", "fine_tuned")].value, rel=1e-6)
    assert scores[("perplexity", "loss", "checkpoint-6")].value < scores[("perplexity", "loss", "base")].value
    # the base model's scores are what lm-eval's simple_evaluate gives on the same model, files and configs
    prepare_offline()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = load_model(STORIES)
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=8)
    for request, metrics in ((EvalRequest("copa", copa, limit=6), ["acc"]),
                             (EvalRequest("perplexity", held_out), ["word_perplexity", "bits_per_byte"])):
        config = task_config(request, tmp_path / "direct" / request.task, count_tokens=token_counter(lm))
        reference = lm_eval.simple_evaluate(model=lm, tasks=[config], limit=request.limit, bootstrap_iters=0,
                                            task_manager=TaskManager(include_defaults=False))["results"]
        for metric in metrics:
            assert scores[(request.task, metric, "base")].value == reference[f"lomo_{request.task}"][f"{metric},none"]
    messages = [e.message for e in events]
    assert any("evaluating the base model: copa (2 of 2)" in m for m in messages)
    assert any("evaluating the fine-tuned model: perplexity (1 of 2)" in m for m in messages)


def test_a_job_cancelled_while_the_base_model_is_scored_never_trains(env):
    settings, db = env
    settings = settings.model_copy(update={"cancel_grace_s": 120.0})  # it must stop by itself, between tasks
    c4 = store_eval_file(settings, db, need_shared(STORIES.parents[1] / "data" / "text" / "c4_demo.jsonl"))
    job_id = submit(settings, db, need_shared(STORIES), need_shared(INSTRUCT), max_steps=50, batch_size=4,
                    max_seq_len=64, evals=[{"task": "perplexity", "file": c4, "limit": 12}] * 3)
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(JobRunner(settings, db).run(job_id)))
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with db.session() as s:
            events, _ = results.list_events(s, "ann", job_id, limit=100)
        if any("evaluating the base model" in e.message for e in events):
            break
        time.sleep(0.1)
    with db.session() as s:
        lifecycle.cancel_job(s, "ann", job_id)
    thread.join(timeout=120)
    assert outcome == ["cancelled"]
    job = job_row(db, job_id)
    assert job.step == 0  # stopped before training
    with db.session() as s:
        events, _ = results.list_events(s, "ann", job_id, limit=100)
    assert any("stopped at a step boundary" in e.message for e in events)  # not killed after the grace period


def test_wake_up_messages_poll_for_their_own_job_and_do_not_multiply(env, tmp_path, tiny_model_dir, monkeypatch):
    settings, db = env
    settings = settings.model_copy(update={"gpu_memory_gib": [24.0, 24.0], "requeue_delay_s": 5})
    row = '{"prompt": "a", "response": "b"}\n'
    sent: list[tuple[str, float | None, bool]] = []
    monkeypatch.setattr(JobRunner, "_send", lambda self, job_id, countdown, poll: sent.append((job_id, countdown,
                                                                                                poll)))
    runner = stub_runner(settings, db, tmp_path, "report-devices")
    assert runner.run("nothing") == "skipped" and sent == []  # an empty queue: the message ends
    big = submit(settings, db, tiny_model_dir, content=row, gpus=2, priority=5)
    small = submit(settings, db, tiny_model_dir, content=row, gpus=1)
    with db.session() as s:  # one of the two GPUs is busy with a job started elsewhere
        s.add(Job(id="busy", owner_id="ann", model="m", training_file_id=job_row(db, small).training_file_id,
                  method="lomo", status="running", gpus=1))
        s.flush()
        s.add(GpuLease(node=settings.worker_name, device_index=0, job_id="busy"))
    # big's message: small starts on the free GPU (backfill); big keeps a poller; small's end wakes one
    assert runner.run(big) == "succeeded"
    assert job_row(db, small).status == "succeeded" and job_row(db, big).status == "queued"
    assert sent == [(big, 5, True), (small, None, False)]
    sent.clear()
    # small's own message: its job has run, and big cannot start: the message ends (no new poller)
    assert runner.run(small) == "waiting" and sent == []
    # big's message again: still waiting, it polls on
    assert runner.run(big) == "waiting" and sent == [(big, 5, True)]


def test_a_resume_never_uses_a_checkpoint_whose_write_was_cut_short(tmp_path):
    """A kill during a save leaves the checkpoint under its temporary name (or, for a partitioned one, a
    folder without its trainer state): the next attempt resumes from the previous complete one."""
    from worker.supervisor import _latest_complete_checkpoint

    root = tmp_path / "checkpoints"
    assert _latest_complete_checkpoint(tmp_path) is None
    for name, complete in (("step-000010", True), (".partial-step-000020", True), ("step-000030", False)):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"x")
        if complete:
            (root / name / "trainer_state.pt").write_bytes(b"x")
    assert _latest_complete_checkpoint(tmp_path) == root / "step-000010"


def run_until_step(settings, db, job_id: str, step: int) -> tuple[threading.Thread, list[str]]:
    """``JobRunner.run`` of ``job_id`` in a thread, once the job has reported ``step``; (the thread, the list
    its result lands in)."""
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(JobRunner(settings, db).run(job_id, poll=False)))
    thread.start()
    deadline = time.monotonic() + 120
    while job_row(db, job_id).step < step:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    return thread, outcome


_UNINTERRUPTED: dict[str, dict[str, torch.Tensor]] = {}


def uninterrupted_weights(settings, db, hyper) -> dict[str, torch.Tensor]:
    """The final weights of a job of ``hyper`` on stories260K run start to end, once per module (the
    run is deterministic: tests that stop and resume a job of the same ``hyper`` compare with one run)."""
    from safetensors.torch import load_file

    key = json.dumps(hyper, sort_keys=True)
    if key not in _UNINTERRUPTED:
        straight = submit(settings, db, need_shared(STORIES), need_shared(INSTRUCT), **hyper)
        assert JobRunner(settings, db).run(straight, poll=False) == "succeeded"
        _UNINTERRUPTED[key] = load_file(str(settings.data_dir / "jobs" / straight / "model" / "model.safetensors"))
    return _UNINTERRUPTED[key]


@pytest.mark.parametrize("ranks", [1, 2])
def test_pause_then_resume_equals_an_uninterrupted_run_and_frees_the_gpus(env, tmp_path, ranks):
    from safetensors.torch import load_file

    from jobs import leases

    settings, db = env
    settings = settings.model_copy(update={"gpu_memory_gib": [24.0] * ranks, "requeue_delay_s": 60})
    # long enough to pause mid-run; on 2 ranks, both checkpoint their partitions together and stop
    steps = 120 if ranks == 1 else 40  # a step on 2 ranks is slower: the pause still lands mid-run
    hyper = {"max_steps": steps, "batch_size": 4, "max_seq_len": 64, "lr": 5e-3}
    if ranks > 1:
        hyper["gpus"] = ranks
    paused_id = submit(settings, db, need_shared(STORIES), need_shared(INSTRUCT), **hyper)
    thread, outcome = run_until_step(settings, db, paused_id, 3)
    with db.session() as s:
        assert lifecycle.pause_job(s, "ann", paused_id).status == "pausing"
    thread.join(timeout=120)
    assert outcome == ["paused"]
    job = job_row(db, paused_id)
    assert job.status == "paused" and 3 <= job.step < steps
    with db.session() as s:
        assert leases.leased_devices(s, settings.worker_name) == {}  # its GPUs are free while it is paused
        assert lifecycle.pause_job(s, "ann", paused_id).status == "paused"  # asked again: nothing changes
    with db.session() as s:
        assert lifecycle.resume_job(s, "ann", paused_id).status == "queued"
    assert JobRunner(settings, db).run(paused_id, poll=False) == "succeeded"
    job = job_row(db, paused_id)
    assert (job.status, job.attempt, job.step) == ("succeeded", 2, steps)
    with pytest.raises(errors.Conflict), db.session() as s:
        lifecycle.pause_job(s, "ann", paused_id)  # an ended job cannot pause
    with db.session() as s:
        logged = [p.step for p in s.query(MetricPoint).filter_by(job_id=paused_id, kind="train")
                  .order_by(MetricPoint.step)]
    assert logged == list(range(1, steps + 1))

    a = load_file(str(settings.data_dir / "jobs" / paused_id / "model" / "model.safetensors"))
    b = uninterrupted_weights(settings, db, hyper)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_job_of_higher_priority_preempts_a_lower_one_which_resumes_to_the_same_weights(env):
    from safetensors.torch import load_file

    from jobs import leases
    from jobs.models import JobEvent

    settings, db = env
    settings = settings.model_copy(update={"gpu_memory_gib": [24.0], "requeue_delay_s": 60, "preempt": True,
                                           "preempt_min_run_s": 0})
    hyper = {"max_steps": 120, "batch_size": 4, "max_seq_len": 64, "lr": 5e-3}
    low = submit(settings, db, need_shared(STORIES), need_shared(INSTRUCT), **hyper)
    thread, outcome = run_until_step(settings, db, low, 3)
    high = submit(settings, db, need_shared(STORIES), need_shared(INSTRUCT), priority=5, max_steps=4,
                  batch_size=4, max_seq_len=64, lr=5e-3)
    # the node's only GPU is low's: the high job's wake-up preempts it, and waits for the GPU
    assert JobRunner(settings, db).run(high, poll=False) == "waiting"
    thread.join(timeout=120)
    assert outcome == ["preempted"]
    row = job_row(db, low)
    assert (row.status, row.preemptions, row.preempted_by) == ("queued", 1, None) and 3 <= row.step < 120
    with db.session() as s:
        assert leases.leased_devices(s, settings.worker_name) == {}
    # a wake-up for low starts high: the queue's order, priority first
    assert JobRunner(settings, db).run(low, poll=False) == "succeeded"
    assert (job_row(db, high).status, job_row(db, low).status) == ("succeeded", "queued")
    assert JobRunner(settings, db).run(low, poll=False) == "succeeded"
    row = job_row(db, low)
    assert (row.status, row.attempt, row.step) == ("succeeded", 2, 120)
    with db.session() as s:
        said = [e.message for e in s.query(JobEvent).filter_by(job_id=low).order_by(JobEvent.id)]
        logged = [p.step for p in s.query(MetricPoint).filter_by(job_id=low, kind="train").order_by(MetricPoint.step)]
    assert any(m.startswith(f"preempted by {high} (priority 5 over 0)") for m in said)
    assert any(m.startswith(f"preempted by {high}: back in the queue") for m in said)
    assert any(m.startswith("resuming from the checkpoint at step") for m in said)
    assert logged == list(range(1, 121))

    a = load_file(str(settings.data_dir / "jobs" / low / "model" / "model.safetensors"))
    b = uninterrupted_weights(settings, db, hyper)  # as when run alone
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_attempt_that_is_no_longer_the_jobs_starts_no_training_process(env, tmp_path, tiny_model_dir):
    """A worker that stalled between its claim and its start (past the heartbeat timeout) finds its job
    recovered elsewhere: it starts nothing, and never names its older attempt in the job's folder."""
    settings, db = env
    job_id = submit(settings, db, tiny_model_dir, content='{"prompt": "a", "response": "b"}\n')
    with db.session() as s:
        assert lifecycle.claim(s, job_id, "w:1")  # attempt 1
    folder = tmp_path / "job"
    folder.mkdir()
    marker = tmp_path / "started"
    runner = JobRunner(settings, db, command=[sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    (folder / ".attempt").write_text("2")  # attempt 2 owns the folder: this one is stale
    report = runner.supervise(job_id, folder / "job-config.json", folder, attempt=1)
    assert report.fenced and not marker.exists() and (folder / ".attempt").read_text() == "2"
    report = runner.supervise(job_id, folder / "job-config.json", folder, attempt=3)  # the job is in attempt 1
    assert report.fenced and not marker.exists()
    (folder / ".attempt").unlink()
    report = runner.supervise(job_id, folder / "job-config.json", folder, attempt=1)  # its own: it starts
    assert not report.fenced and marker.exists() and (folder / ".attempt").read_text() == "1"
