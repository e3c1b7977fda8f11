"""The `lomo` client commands against a real `lomo serve` (zero-configuration default: SQLite, the SQLite
broker, one worker beside the API), run in-process with typer's CliRunner.

One server for the module; its worker runs one job at a time, so the jobs here are few and tiny
(stories260K, 2-4 steps of 64 tokens).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from client.cli import app
from client.config import ConfigFileError, resolve
from client.rest import LomoClient
from tests.conftest import STORIES, need_shared
from tests.e2e.live_service import free_port, start_service

RECORDS = [("Say hello.", "Hello there, friend."), ("Name a color.", "Blue is a color."),
           ("Count to three.", "One, two, three."), ("What is a cat?", "A cat is a small animal."),
           ("Say goodbye.", "Goodbye, see you soon."), ("Name a fruit.", "An apple is a fruit."),
           ("What is the sun?", "The sun is a star."), ("Say thanks.", "Thank you very much.")]
SMALL = ["--max-steps", "4", "--batch-size", "2", "--set", "max_seq_len=64"]


@dataclass
class Service:
    url: str
    home: Path
    log: Path
    train: Path  # a valid 8-record training file
    api_key: str

    def lomo(self, *args: str, env: dict[str, str] | None = None):
        """Run `lomo ARGS` in-process against this service (LOMO_URL, LOMO_API_KEY), with an empty config file."""
        full_env = {"LOMO_URL": self.url, "LOMO_API_KEY": self.api_key, "LOMO_CONFIG": str(self.home / "empty.toml"),
                    "LOMO_DATA_DIR": str(self.home / "elsewhere")}
        full_env.update(env or {})
        return CliRunner().invoke(app, list(args), env=full_env)

    def json(self, *args: str, code: int = 0):
        result = self.lomo(*args, "--json")
        assert result.exit_code == code, (result.stdout, result.stderr, self.log.read_text()[-2000:])
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    need_shared(STORIES)
    home = tmp_path_factory.mktemp("lomo-cli")
    (home / "empty.toml").write_text("")
    train = home / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in RECORDS))
    live = start_service("embedded", home, cancel_grace_s="2")
    yield Service(live.url, home, live.logs[-1], train, live.api_key)
    live.stop()


def test_files_upload_list_show_rm(service, tmp_path):
    file = service.json("files", "upload", str(service.train))
    assert file["id"].startswith("file-") and file["records"] == len(RECORDS) and file["purpose"] == "fine-tune"
    assert file["id"] in [f["id"] for f in service.json("files", "list")]
    assert service.json("files", "show", file["id"])["filename"] == "train.jsonl"
    listed = service.lomo("files", "list")
    assert listed.exit_code == 0 and file["id"] in listed.stdout  # the table never cuts an id
    assert service.json("files", "rm", file["id"])["deleted"] is True
    gone = service.lomo("files", "show", file["id"], "--json")
    assert gone.exit_code == 2 and file["id"] in gone.stderr and gone.stdout == ""

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{"prompt": "e", "resp\n')
    refused = service.lomo("files", "upload", str(bad))
    assert refused.exit_code == 2 and "line 3" in refused.stderr
    wrong = service.lomo("files", "upload", str(service.train), "--purpose", "training")
    assert wrong.exit_code == 2 and "--purpose" in wrong.stderr


def test_submit_from_a_spec_and_options_waits_for_success(service, tmp_path):
    spec = tmp_path / "job.yaml"  # the training file is a path relative to the spec; the options override it
    spec.write_text(f"model: stories260K\ntraining_file: {os.path.relpath(service.train, tmp_path)}\n"
                    "metadata: {suite: cli}\nmethod:\n  type: supervised\n  supervised:\n"
                    "    hyperparameters: {max_steps: 50, max_seq_len: 64, optimizer: adalomo}\n")
    job = service.json("submit", "--spec", str(spec), "--max-steps", "4", "--batch-size", "2", "--optimizer", "lomo",
                       "--set", "lr_schedule=cosine", "--set", "warmup_steps=1", "--set", "validation_split=0.25",
                       "--metadata", "case=ok", "--suffix", "cli", "--wait")
    assert job["status"] == "succeeded", job
    assert job["progress"]["step"] == 4 and job["progress"]["total_steps"] == 4
    hp = job["hyperparameters"]
    assert (hp["max_steps"], hp["batch_size"], hp["optimizer"], hp["lr_schedule"], hp["warmup_steps"]) == \
        (4, 2, "lomo", "cosine", 1)
    assert job["metadata"] == {"suite": "cli", "case": "ok"}
    job_id = job["id"]
    assert job["fine_tuned_model"] == f"ft:stories260K:cli:{job_id}"

    assert service.json("status", job_id)["status"] == "succeeded"
    shown = service.lomo("status", job_id)
    assert shown.exit_code == 0 and "succeeded" in shown.stdout and job_id in shown.stdout
    assert service.lomo("status", job_id, "--wait").exit_code == 0

    events = service.json("events", job_id)
    assert [e["created_at"] for e in events] == sorted(e["created_at"] for e in events)  # oldest first
    assert events[0]["message"].startswith("job created") and events[-1]["message"] == "job succeeded"
    followed = service.lomo("events", job_id, "--follow", "--json")  # the job has ended: no waiting
    assert followed.exit_code == 0
    assert [json.loads(line)["id"] for line in followed.stdout.splitlines()] == [e["id"] for e in events]

    evals = service.json("evals", job_id)
    assert {(e["task"], e["metric"], e["model"]) for e in evals} >= {("validation_loss", "loss", "fine_tuned")}
    table = service.lomo("evals", job_id)
    assert table.exit_code == 0 and "validation_loss" in table.stdout and "fine_tuned" in table.stdout

    mine = service.json("jobs", "--metadata", "case=ok")
    assert [j["id"] for j in mine] == [job_id]
    assert service.json("jobs", "--limit", "1")[0]["id"] == job_id  # newest first
    assert job_id in service.lomo("jobs").stdout

    estimate = service.json("estimate", "--model", "stories260K", "--training-file", job["training_file"], *SMALL)
    assert estimate["fits"] is True and estimate["per_device_gib"] >= 0 and estimate["per_device"]["peak_bytes"] > 0

    assert job["fine_tuned_model"] in [m["id"] for m in service.json("models", "list")]
    folder = Path(service.json("models", "download", job["fine_tuned_model"], "-o", str(tmp_path / "dl"))["path"])
    assert folder.is_relative_to(tmp_path / "dl") and (folder / "config.json").is_file()
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.arange(1, 17).unsqueeze(0)
    written = service.home / "var" / "jobs" / job_id / "model"  # the weights the job wrote, on the server
    with torch.no_grad():
        downloaded_logits = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
        assert torch.equal(downloaded_logits, AutoModelForCausalLM.from_pretrained(written)(ids).logits)
        assert not torch.equal(downloaded_logits, AutoModelForCausalLM.from_pretrained(STORIES)(ids).logits)

    ended = service.lomo("cancel", job_id)
    assert ended.exit_code == 2 and "succeeded" in ended.stderr
    paused = service.lomo("pause", job_id)  # an ended job cannot pause: a 4xx
    assert paused.exit_code == 2 and paused.stderr.strip() and paused.stdout == ""

    assert service.json("version")["version"]


def test_a_job_that_fails_exits_1_with_its_error(service):
    job = service.json("submit", "--model", "stories260K", "--training-file", str(service.train), *SMALL,
                       "--learning-rate-multiplier", "1e9")
    assert job["status"] == "queued"
    followed = service.lomo("events", job["id"], "--follow", "--json")  # returns once the job has ended
    assert followed.exit_code == 0
    events = [json.loads(line) for line in followed.stdout.splitlines()]
    assert events[0]["message"].startswith("job created") and events[-1]["level"] == "error"
    assert len({e["id"] for e in events}) == len(events)  # nothing printed twice while polling
    waited = service.lomo("status", job["id"], "--wait")
    assert waited.exit_code == 1 and "failed" in waited.stdout and "nan_loss" in waited.stdout
    job = service.json("status", job["id"])  # showing a failed job is not an error
    assert job["status"] == "failed" and job["error"]["code"] == "nan_loss"


def test_bad_values_exit_2_naming_the_field_or_line(service, tmp_path):
    base = ["submit", "--model", "stories260K", "--training-file", str(service.train)]
    server_side = service.lomo(*base, "--set", "max_seq_len=1")
    assert server_side.exit_code == 2 and "max_seq_len" in server_side.stderr
    for option, value in (("--n-epochs", "many"), ("--learning-rate-multiplier", "fast"), ("--optimizer", "adam"),
                          ("--metadata", "novalue"), ("--set", "novalue")):
        result = service.lomo(*base, option, value)
        assert result.exit_code == 2 and option in result.stderr, (option, result.stderr)
    missing = service.lomo("submit", "--training-file", str(service.train))
    assert missing.exit_code == 2 and "--model" in missing.stderr
    nowhere = service.lomo("submit", "--model", "stories260K", "--training-file", str(tmp_path / "none.jsonl"))
    assert nowhere.exit_code == 2 and "training_file" in nowhere.stderr and "no file" in nowhere.stderr
    unknown = service.lomo("submit", "--model", "no-such-model", "--training-file", str(service.train))
    assert unknown.exit_code == 2 and "model" in unknown.stderr and "no-such-model" in unknown.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{"prompt": "e"}\n')
    line = service.lomo("submit", "--model", "stories260K", "--training-file", str(bad), "--json")
    assert line.exit_code == 2 and "training_file: line 3" in " ".join(line.stderr.split()) and line.stdout == ""
    spec = tmp_path / "spec.json"
    spec.write_text('{"model": "stories260K",\n "training_file": }')
    broken = service.lomo("submit", "--spec", str(spec))
    assert broken.exit_code == 2 and "--spec" in broken.stderr and "line 2" in broken.stderr


def test_no_service_exits_3_naming_the_url(service, tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}"
    by_option = service.lomo("jobs", "--url", nowhere, "--json")
    assert by_option.exit_code == 3 and nowhere in by_option.stderr and by_option.stdout == ""
    download = service.lomo("models", "download", "ft:x::y", "-o", str(tmp_path / "dl"), "--url", nowhere)
    assert download.exit_code == 3 and nowhere in download.stderr
    by_env = service.lomo("submit", "--model", "stories260K", "--training-file", str(service.train),
                          env={"LOMO_URL": nowhere})
    assert by_env.exit_code == 3 and nowhere in by_env.stderr and "LOMO_URL" in by_env.stderr
    config = tmp_path / "config.toml"
    config.write_text(f'url = "{nowhere}"\napi_key = "k"\n')
    by_file = service.lomo("status", "ftjob-x", env={"LOMO_URL": None, "LOMO_CONFIG": str(config)})
    assert by_file.exit_code == 3 and nowhere in by_file.stderr and str(config) in " ".join(by_file.stderr.split())
    # the option wins over the environment
    assert service.lomo("jobs", "--url", service.url, env={"LOMO_URL": nowhere}).exit_code == 0
    bad = service.lomo("jobs", "--url", "127.0.0.1:8000")
    assert bad.exit_code == 2 and "--url" in bad.stderr


def test_the_url_and_key_come_from_option_env_then_file(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('url = "http://head:9000/"\napi_key = "from-file"\n')
    env = {"LOMO_CONFIG": str(config)}
    target = resolve(env=env)
    assert (target.url, target.api_key, target.url_source) == ("http://head:9000", "from-file", str(config))
    target = resolve(env={**env, "LOMO_URL": "http://env:1", "LOMO_API_KEY": "from-env"})
    assert (target.url, target.api_key) == ("http://env:1", "from-env")
    target = resolve("http://opt:2", "from-option", env={**env, "LOMO_URL": "http://env:1"})
    assert (target.url, target.api_key, target.url_source) == ("http://opt:2", "from-option", "--url")
    assert resolve(env={"LOMO_CONFIG": str(tmp_path / "absent.toml"), "LOMO_URL": "http://x:1",
                        "LOMO_API_KEY": "k"}).url == "http://x:1"  # the file is not read when not needed
    with pytest.raises(ConfigFileError, match="LOMO_CONFIG"):
        resolve(env={"LOMO_CONFIG": str(tmp_path / "absent.toml")})
    config.write_text("url = [1\n")
    with pytest.raises(ConfigFileError, match="invalid TOML"):
        resolve(env=env)
    # the key is sent as a bearer token
    seen = []
    transport = httpx.MockTransport(lambda request: seen.append(request.headers.get("authorization"))
                                    or httpx.Response(200, json={"data": []}))
    LomoClient("http://x", api_key="secret", transport=transport).list_files()
    LomoClient("http://x", transport=transport).list_files()
    assert seen == ["Bearer secret", None]
    # with no key from anywhere else: the one a service on this machine wrote at its first start
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    local = {"LOMO_CONFIG": str(empty), "LOMO_DATA_DIR": str(tmp_path / "var")}
    assert resolve(env=local).api_key is None
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "admin-key").write_text("lomo-key_0123456789abcdef-secret\n")
    assert resolve(env=local).api_key == "lomo-key_0123456789abcdef-secret"
    assert resolve(env={**local, "LOMO_API_KEY": "from-env"}).api_key == "from-env"


def test_a_2x2_sweep_submits_4_tagged_jobs(service, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(service.train.read_text())
    spec = tmp_path / "sweep.json"
    spec.write_text(json.dumps({
        "base": {"model": "stories260K", "training_file": "data/train.jsonl", "metadata": {"suite": "sweep"},
                 "method": {"type": "supervised", "supervised": {"hyperparameters": {"max_steps": 2,
                                                                                     "max_seq_len": 64}}}},
        "grid": {"learning_rate_multiplier": [0.5, 2], "batch_size": [1, 2]}}))
    answer = service.json("sweep", str(spec))
    runs = answer["runs"]
    assert [r["values"] for r in runs] == [
        {"learning_rate_multiplier": 0.5, "batch_size": 1}, {"learning_rate_multiplier": 0.5, "batch_size": 2},
        {"learning_rate_multiplier": 2, "batch_size": 1}, {"learning_rate_multiplier": 2, "batch_size": 2}]
    tagged = service.json("jobs", "--metadata", f"sweep={answer['sweep']}")
    assert sorted(j["id"] for j in tagged) == sorted(r["job_id"] for r in runs)
    by_id = {j["id"]: j for j in tagged}
    for i, run in enumerate(runs):
        job = by_id[run["job_id"]]
        assert job["metadata"] == {"suite": "sweep", "sweep": answer["sweep"], "sweep_run": str(i)}
        assert job["hyperparameters"]["learning_rate_multiplier"] == run["values"]["learning_rate_multiplier"]
        assert job["hyperparameters"]["batch_size"] == run["values"]["batch_size"]
    # not waited for (the 4 jobs run one after another, in order): cancelled from the last, which is surely still
    # queued and so cancelled at once; an earlier one may have started (cancel requested) or even ended (exit 2)
    at_once = []
    for run in reversed(runs):
        cancelled = service.lomo("cancel", run["job_id"], "--json")
        assert cancelled.exit_code in (0, 2), cancelled.stderr
        if cancelled.exit_code == 0 and json.loads(cancelled.stdout)["status"] == "cancelled":
            at_once.append(run["job_id"])
        elif cancelled.exit_code == 0:
            assert json.loads(cancelled.stdout)["cancel_requested"] is True
    assert runs[-1]["job_id"] in at_once
    for run in runs:
        waited = service.lomo("status", run["job_id"], "--wait", "--json")
        ended = (json.loads(waited.stdout)["status"], waited.exit_code)
        assert ended == ("cancelled", 1) if run["job_id"] in at_once else ended in (("cancelled", 1), ("succeeded", 0))

    # a run the server refuses: the run is named, and the jobs already submitted are cancelled
    spec.write_text(json.dumps({"base": {"model": "stories260K", "training_file": "data/train.jsonl"},
                                "runs": [{"max_steps": 2, "max_seq_len": 64}, {"max_seq_len": 1}]}))
    refused = service.lomo("sweep", str(spec))
    assert refused.exit_code == 2 and "run 1 (max_seq_len=1)" in refused.stderr and "max_seq_len" in refused.stderr
    sweep_id = re.search(r"sweep-[0-9a-f]+", refused.stderr).group(0)
    (first,) = service.json("jobs", "--metadata", f"sweep={sweep_id}")
    assert first["status"] == "cancelled" or first["cancel_requested"]


def test_status_tells_a_jobs_history_of_recoveries_and_preemptions(monkeypatch):
    import io

    from rich.console import Console

    from client import cli

    def shown(**fields) -> str:
        buffer = io.StringIO()
        monkeypatch.setattr(cli, "out", Console(file=buffer, width=200))
        cli._show_job({"id": "ftjob-1", "status": "running", "attempt": 1, "recoveries": 0, "preemptions": 0,
                       "preempted_by": None, **fields})
        return buffer.getvalue()

    assert "history" not in shown()  # a first attempt has none
    text = shown(status="pausing", attempt=4, recoveries=1, preemptions=2, preempted_by="ftjob-2")
    line = next(line for line in text.splitlines() if line.startswith("history"))
    assert "attempt 4" in line and "1 recovered after a lost worker" in line and "2 preempted" in line
    assert "stopping for ftjob-2" in line


def test_whoami_and_an_admin_registering_a_model(service, tmp_path):
    me = service.json("whoami")
    assert me["is_admin"] is True and me["usage"]["queued_jobs"] >= 0 and "queued_jobs" in me["quotas"]
    shown = service.lomo("whoami")
    assert shown.exit_code == 0 and "admin" in shown.stdout and "queued_jobs" in shown.stdout
    made = service.json("models", "register", "stories-copy", str(STORIES))
    assert made["id"] == "stories-copy" and str(STORIES) not in json.dumps(made)
    assert "stories-copy" in {m["id"] for m in service.json("models", "list")}
    job = service.json("submit", "--model", "stories-copy", "--training-file", str(service.train), *SMALL)
    assert job["model"] == "stories-copy"
    service.lomo("cancel", job["id"])
    missing = service.lomo("models", "register", "nothing", str(tmp_path / "none"))
    assert missing.exit_code == 2 and "path" in missing.stderr and str(tmp_path) not in missing.stderr
    taken = service.lomo("models", "register", "stories-copy", str(STORIES))
    assert taken.exit_code != 0 and "exists already" in taken.stderr
