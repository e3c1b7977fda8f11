"""The portal in a real browser: Debian's Chromium, headless, driven by Playwright, against `lomo serve` +
`lomo worker` on Postgres and Redis. Jobs train stories260K for real. Every page is saved to
docs/screenshots/ (at 1280 px, and some at a phone's 390 px), and every request any page makes is checked
to stay on the service's own host."""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import SHARED, STORIES, need_shared
from tests.e2e.live_service import ROOT, start_service

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "docs" / "screenshots"
COPA = SHARED / "data" / "superglue" / "COPA" / "val.jsonl"
STORY_ROWS = [{"messages": [{"role": "user", "content": f"Tell me about the {animal}."},
                            {"role": "assistant", "content": f"Once upon a time there was a {animal} who played."}]}
              for animal in ("cat", "dog", "bird", "fish", "frog", "bear", "lion", "duck")]
TRAINING = "".join(json.dumps(row) + "\n" for row in STORY_ROWS)
#: line 2 is not JSON, line 3 has no text at all
BAD_TRAINING = json.dumps(STORY_ROWS[0]) + "\n{not json\n" + json.dumps({"messages": []}) + "\n"
WIDE, NARROW = {"width": 1280, "height": 900}, {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    need_shared(STORIES)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install chromium); .ci/run does")
    live = start_service("postgres+redis", tmp_path_factory.mktemp("portal"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def api(service):
    with httpx.Client(base_url=service.url, headers=service.headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def people(api):
    """Two users besides the admin: ann (whose session most tests use) and bob."""
    keys = {}
    for name in ("ann", "bob"):
        answer = api.post("/v1/admin/users", json={"name": name})
        assert answer.status_code == 200, answer.text
        keys[name] = answer.json()["api_key"]["key"]
    return keys


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Visit:
    """A browser context of one test: every request its pages make is recorded, and dialogs are accepted."""

    def __init__(self, browser, url: str, viewport=WIDE) -> None:
        self.url = url
        self.context = browser.new_context(viewport=viewport, base_url=url)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.context.on("request", lambda r: self.requests.append(r.url))
        self.page = self.context.new_page()
        self.page.on("dialog", lambda d: d.accept())
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # a 4xx a test asks for shows in the console too: answers are checked by status, the console for the rest
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}")
                     if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
        self.page.on("response", lambda r: self.errors.append(f"{r.status} from {r.url}") if r.status >= 500 else None)

    def sign_in(self, key: str) -> None:
        self.page.goto("/signin")
        self.page.fill("#key", key)
        self.page.click("button[type=submit]")
        self.page.wait_for_url("**/jobs")

    def new_job_with_training(self, tmp_path: Path, content: str, model: str | None = STORIES.name) -> None:
        """The new-job form with ``model`` chosen and ``content`` uploaded as its training file."""
        self.page.goto("/jobs/new")
        path = tmp_path / "training.jsonl"
        path.write_text(content)
        if model:
            self.page.select_option("#f-model", model)
        self.page.set_input_files("input[data-upload-for='f-training_file']", str(path))

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        own = urlsplit(self.url).netloc
        elsewhere = [u for u in self.requests if urlsplit(u).scheme in ("http", "https", "ws", "wss")
                     and urlsplit(u).netloc != own]
        self.context.close()
        assert not elsewhere, f"requests to another host: {elsewhere}"
        assert self.requests, "the browser made no request at all"
        assert not self.errors, f"script errors on the pages: {self.errors}"


@pytest.fixture
def visit(browser, service):
    opened: list[Visit] = []

    def open_visit(viewport=WIDE, url: str | None = None) -> Visit:
        opened.append(Visit(browser, url or service.url, viewport))
        return opened[-1]

    yield open_visit
    for v in opened:
        v.close()


def api_as(service, key: str) -> httpx.Client:
    return httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def wait_for_status(client: httpx.Client, job_id: str, wanted: set[str], service, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in wanted:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} is {job['status']}, not {wanted}\n{service.log_tail()}")


def submit_by_api(client: httpx.Client, training: str, **hyperparameters) -> str:
    file_id = client.post("/v1/files", files={"file": ("stories.jsonl", training.encode())},
                          data={"purpose": "fine-tune"}).json()["id"]
    body = {"model": STORIES.name, "training_file": file_id,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}}
    answer = client.post("/v1/fine_tuning/jobs", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def test_sign_in_with_a_key_and_a_wrong_key_is_refused(visit, service, people):
    v = visit()
    v.page.goto("/jobs")
    assert urlsplit(v.page.url).path == "/signin"  # no session: to the sign-in page
    v.shot("signin")
    v.page.fill("#key", "lomo-key_0123456789abcdef-" + "x" * 43)
    v.page.click("button[type=submit]")
    assert "This API key is not valid" in v.page.inner_text("#key-error")
    assert urlsplit(v.page.url).path == "/signin"
    # by keyboard alone: the key field has the focus, Enter submits
    v.page.goto("/signin")
    v.page.keyboard.type(people["ann"])
    v.page.keyboard.press("Enter")
    v.page.wait_for_url("**/jobs")
    assert v.page.inner_text("#whoami").strip() == "ann"
    cookie = next(c for c in v.context.cookies() if c["name"] == "lomo_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["secure"]
    assert people["ann"] not in json.dumps(v.context.cookies())  # the browser holds a session, not the key
    assert v.page.evaluate("document.cookie") == ""  # no script of a page can read it
    v.page.click("text=Sign out")
    v.page.wait_for_url("**/signin")
    v.page.goto("/jobs")
    assert urlsplit(v.page.url).path == "/signin"


def test_another_users_job_is_not_visible(visit, service, people):
    with api_as(service, people["bob"]) as bob:
        bobs = submit_by_api(bob, TRAINING, max_steps=1, batch_size=4, max_seq_len=64)
    v = visit()
    v.sign_in(people["ann"])
    assert v.page.locator(f"tr[data-job='{bobs}']").count() == 0 and bobs not in v.page.content()
    v.page.goto(f"/jobs/{bobs}")
    assert "There is no job" in v.page.inner_text("main")
    assert v.page.evaluate(f"fetch('/v1/fine_tuning/jobs/{bobs}').then(r => r.status)") == 404


def test_a_bad_training_file_shows_its_line_numbers_beside_the_field(visit, service, people, tmp_path):
    v = visit()
    v.sign_in(people["ann"])
    v.new_job_with_training(tmp_path, BAD_TRAINING, model=None)
    error = v.page.locator("#err-upload-training_file")
    error.filter(has_text="line 2").wait_for()
    text = error.inner_text()
    assert "line 2" in text and "line 3" in text, text
    assert v.page.get_attribute("#f-training_file", "aria-invalid") == "true"
    v.shot("new-job-bad-file")


def test_a_job_that_cannot_fit_shows_why_before_submit(visit, service, people, tmp_path):
    v = visit()
    v.sign_in(people["ann"])
    v.new_job_with_training(tmp_path, TRAINING)
    v.page.locator("#verdict").filter(has_text="Fits").wait_for()
    v.page.fill("#f-batch_size", "64")
    v.page.fill("#f-max_seq_len", "2000000")
    verdict = v.page.locator("#verdict")
    verdict.filter(has_text="Does not fit").wait_for()
    assert "GiB" in v.page.inner_text("#why")  # the reason: what it needs against what the node has
    v.shot("new-job-does-not-fit")
    v.page.click("#submit-job")  # submitted anyway: refused, the form kept, the reason at the top
    assert "cannot fit" in v.page.inner_text("#form-problems")
    assert v.page.input_value("#f-max_seq_len") == "2000000"


def test_submit_through_the_form_watch_it_train_and_cancel_another(visit, service, api, people, tmp_path):
    v = visit()
    v.sign_in(people["ann"])
    v.page.goto("/files")
    copa = tmp_path / "copa.jsonl"
    copa.write_text("".join(COPA.read_text().splitlines(keepends=True)[:6]))
    v.page.select_option("#upload-purpose", "eval")
    with v.page.expect_navigation():
        v.page.set_input_files("#upload-file", str(copa))
    assert v.page.locator("#files tr", has_text="copa.jsonl").count() == 1
    v.new_job_with_training(tmp_path, TRAINING)
    v.page.locator("#verdict").filter(has_text="Fits").wait_for()
    for name, value in (("max_steps", "6"), ("batch_size", "2"), ("max_seq_len", "96"),
                        ("learning_rate_multiplier", "0.5")):
        v.page.fill(f"#f-{name}", value)
    v.page.click("text=More settings")
    v.page.fill("#f-validation_split", "0.25")
    v.page.fill("#f-eval_every", "2")
    v.page.select_option("select[name=eval_0_task]", "copa")
    v.page.select_option("select[name=eval_0_file]", label="copa.jsonl · 6 rows")
    v.page.fill("input[name=eval_0_limit]", "4")
    v.page.fill("#f-metadata", "case=portal")
    v.page.locator("#verdict").filter(has_text="Fits").wait_for()
    v.shot("new-job")
    v.page.click("#submit-job")
    v.page.wait_for_url("**/jobs/ftjob-*")
    job_id = urlsplit(v.page.url).path.rsplit("/", 1)[1]

    # the list shows it, with its live status
    lister = visit()
    lister.sign_in(people["ann"])
    row = lister.page.locator(f"tr[data-job='{job_id}']")
    assert row.count() == 1 and STORIES.name in row.inner_text()

    # its page follows it to the end without a reload
    v.page.locator("#job-status").filter(has_text="succeeded").wait_for(timeout=240_000)
    lister.page.locator(f"tr[data-job='{job_id}'][data-status='succeeded']").wait_for(timeout=30_000)
    lister.shot("jobs")
    metrics = api.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", params={"limit": 10000}).json()["data"]
    trains = [m for m in metrics if m["kind"] == "train"]
    assert len(trains) == 6 and any(m["kind"] == "val" for m in metrics)
    chart = v.page.locator(f"#chart-loss[data-points='{len(metrics)}']")
    chart.wait_for(timeout=30_000)  # as many points as the API has
    assert v.page.evaluate("window.lomoCharts.loss.data.datasets[1].data.length") == len(trains)
    memory = api.get(f"/v1/fine_tuning/jobs/{job_id}/memory").json()
    ranks = len(memory["measured"])
    assert ranks >= 1
    v.page.locator(f"#chart-memory[data-measured-ranks='{ranks}']").wait_for(timeout=30_000)
    evals = v.page.inner_text("#evals")
    assert "copa" in evals and "validation_loss" in evals
    copa_row = v.page.locator("#evals tr", has_text="copa").first.inner_text()
    assert copa_row.count("…") == 0  # both the base and the fine-tuned score
    assert v.page.locator("#checkpoints li").count() >= 1
    assert v.page.locator("a", has_text="Download (.tar)").count() == 1
    v.shot("job")
    v.page.set_viewport_size(NARROW)
    v.shot("job-narrow")

    # "new job like this" fills the form with its settings
    v.page.set_viewport_size(WIDE)
    v.page.click("text=New job like this")
    assert v.page.input_value("#f-max_steps") == "6" and v.page.input_value("#f-max_seq_len") == "96"
    assert v.page.input_value("#f-learning_rate_multiplier") == "0.5"
    assert v.page.input_value("select[name=eval_0_task]") == "copa"

    # cancel a long job from its page
    with api_as(service, people["ann"]) as ann:
        long_one = submit_by_api(ann, TRAINING, max_steps=100000, batch_size=1, max_seq_len=64)
        wait_for_status(ann, long_one, {"running"}, service)
        v.page.goto(f"/jobs/{long_one}")
        v.page.click("#main .heading button:has-text('Cancel')")
        v.page.locator("#job-status").filter(has_text="cancelled").wait_for(timeout=120_000)
        assert wait_for_status(ann, long_one, {"cancelled"}, service, 10)["status"] == "cancelled"


def test_compare_two_finished_jobs(visit, service, people):
    with api_as(service, people["ann"]) as ann:
        first = submit_by_api(ann, TRAINING, max_steps=3, batch_size=2, max_seq_len=64, learning_rate_multiplier=1.0)
        second = submit_by_api(ann, TRAINING, max_steps=3, batch_size=2, max_seq_len=64, learning_rate_multiplier=0.25)
        for job_id in (first, second):
            assert wait_for_status(ann, job_id, {"succeeded", "failed", "cancelled"}, service)["status"] == "succeeded"
    v = visit()
    v.sign_in(people["ann"])
    v.page.check(f"#pick-{first}")
    v.page.check(f"#pick-{second}")
    v.page.click("text=Compare selected")
    v.page.wait_for_url("**/compare?*")
    v.page.locator("#chart-compare[data-curves='2']").wait_for(timeout=30_000)
    assert v.page.evaluate("window.lomoCharts.compare.data.datasets.filter(d => d.data.length > 0).length") >= 2
    differing = v.page.locator("#compare-settings tr.differs").evaluate_all(
        "rows => rows.map(r => r.getAttribute('data-setting'))")
    assert "learning_rate_multiplier" in differing and "lr" in differing
    assert "model" not in differing and "max_steps" not in differing
    assert "≠ differs" in v.page.locator("#compare-settings tr[data-setting='lr']").inner_text()  # not colour alone
    v.shot("compare")
    v.page.check("#only-differences")
    shown = v.page.locator("#compare-settings tbody tr:visible").evaluate_all(
        "rows => rows.map(r => r.getAttribute('data-setting'))")
    assert sorted(shown) == sorted(differing)


def test_cluster_files_and_models_pages(visit, service, people, api):
    v = visit()
    v.sign_in(service.api_key)  # the admin
    v.page.goto("/cluster")
    assert v.page.locator(".node").count() == 1 and "A CPU node" in v.page.inner_text(".node")
    v.page.goto("/files")
    assert v.page.locator("#files tbody tr").count() >= 1
    v.shot("files")
    v.page.goto("/models")
    assert v.page.locator(f"#models tr[data-model='{STORIES.name}']").count() == 1
    assert "safetensors" in v.page.inner_text(f"#models tr[data-model='{STORIES.name}']")
    assert str(STORIES.parent) not in v.page.content()  # names, never the server's paths
    v.shot("models")
    narrow = visit(NARROW)
    narrow.sign_in(people["ann"])
    narrow.shot("jobs-narrow")
    overflow = narrow.page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 1, f"the page is {overflow}px wider than a 390px screen"
    narrow.page.goto("/jobs/new")
    narrow.shot("new-job-narrow")


@pytest.fixture(scope="module")
def gpu_lab(tmp_path_factory):
    """An API (no worker) over a Postgres database holding a lab's state: two 8-GPU nodes, running jobs of
    ann and bob holding GPUs, the last hours' released leases, and a queue."""
    from jobs.models import File, GpuLease, Job, Node
    from jobs.settings import Settings
    from jobs.users import create_user
    from tests.conftest import create_postgres_database, drop_postgres_database
    from tests.e2e.live_service import api_in_thread

    url = create_postgres_database()
    settings = Settings(data_dir=tmp_path_factory.mktemp("lab") / "var", database_url=url, device="cpu")
    with api_in_thread(settings) as base:
        from jobs.db import database

        now = datetime.now(timezone.utc)
        with database(url).session() as s:
            ann, ann_key = create_user(s, "ann")
            bob, _ = create_user(s, "bob")
            s.add_all([Node(name=f"gpu-node-{n}", gpu_memory_gib=[24.0] * 8, seen_at=now) for n in (1, 2)])
            for user in (ann, bob):
                s.add(File(id=f"file-{user.name}", owner_id=user.id, filename="d.jsonl", purpose="fine-tune",
                           bytes=1, storage_path="x", records=8))
            s.flush()

            def job(job_id, user, status, gpus=1, priority=0, minutes_ago=0, **fields):
                s.add(Job(id=job_id, owner_id=user.id, model="llama-7b", training_file_id=f"file-{user.name}",
                          method="lomo", status=status, gpus=gpus, priority=priority,
                          hyperparameters={"epochs": 1, "batch_size": 8, "lr": 0.01, "seed": 42},
                          created_at=now - timedelta(minutes=minutes_ago), **fields))

            held = {"ftjob-ann-13b": (ann, "gpu-node-1", [0, 1]), "ftjob-bob-30b": (bob, "gpu-node-2", [0, 1, 2, 3]),
                    "ftjob-ann-7b": (ann, "gpu-node-1", [2])}
            for job_id, (user, node, devices) in held.items():
                job(job_id, user, "running", gpus=len(devices), minutes_ago=90, claimed_by=f"{node}:7",
                    started_at=now - timedelta(minutes=80), heartbeat_at=now)
            for n, (user, gpus, priority) in enumerate([(bob, 8, 5), (ann, 1, 0), (bob, 2, 0)]):
                job(f"ftjob-queued-{n}", user, "queued", gpus=gpus, priority=priority, minutes_ago=30 - n)
            for n in range(4):
                job(f"ftjob-done-{n}", (ann, bob)[n % 2], "succeeded", minutes_ago=400)
            s.flush()
            for job_id, (_user, node, devices) in held.items():
                s.add_all([GpuLease(node=node, device_index=d, job_id=job_id, leased_at=now - timedelta(minutes=80))
                           for d in devices])
            for n in range(4):
                s.add_all([GpuLease(node=f"gpu-node-{1 + n % 2}", device_index=d, job_id=f"ftjob-done-{n}",
                                    leased_at=now - timedelta(minutes=360 - 60 * n),
                                    released_at=now - timedelta(minutes=300 - 60 * n)) for d in range(4, 8)])
            key = ann_key.secret
        yield base, key, held
    drop_postgres_database(url)


def test_the_cluster_page_shows_who_holds_each_gpu_the_queue_and_the_timeline(visit, gpu_lab):
    base, ann_key, held = gpu_lab
    v = visit(url=base)
    v.sign_in(ann_key)
    v.page.goto("/cluster?hours=24")
    assert v.page.locator(".node").count() == 2
    assert v.page.locator(".gpu.held").count() == sum(len(devices) for *_, devices in held.values())
    assert v.page.locator(".gpu.free").count() == 16 - v.page.locator(".gpu.held").count()
    assert v.page.locator(".gpu.mine").count() == 3  # ann's 13B on two GPUs and her 7B on one
    page = v.page.content()
    assert "ftjob-ann-13b" in page and "ftjob-bob-30b" not in page  # bob's job: his name, not its id
    assert "a job</span>" not in page and "a job of bob" in v.page.inner_text(".nodes")
    queue = v.page.locator("#queue tbody tr").all_inner_texts()
    assert [row.split("\t")[0] for row in queue] == ["1", "2", "3"]
    assert "bob" in queue[0] and "ftjob-queued-1" in queue[1]  # priority 5 first, then first come
    bars = v.page.evaluate("window.lomoCharts.timeline.data.datasets.map(d => [d.label, d.data.length])")
    assert sorted(bars) == [["ann", 2 + 1 + 8], ["bob", 4 + 8]]  # held now, and the released ones of the day
    v.shot("cluster")
    v.page.goto("/cluster?hours=1")  # the released leases ended more than an hour ago
    bars = v.page.evaluate("window.lomoCharts.timeline.data.datasets.map(d => [d.label, d.data.length])")
    assert sorted(bars) == [["ann", 3], ["bob", 4]]
