from __future__ import annotations

import contextlib
import copy
import http.server
import os
import socket
import threading
import uuid
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
INSTRUCT = SHARED / "data" / "instruct" / "alpaca_en_demo.json"


def tiny_llama(tied: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).to(dtype)


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def batches(n: int, vocab: int = 96, batch: int = 2, seq: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def clone(model):
    return copy.deepcopy(model)


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not present (../shared is read in place, never copied)")
    return path


# ---------------------------------------------------------------------------------------------- service
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"


def create_postgres_database() -> str:
    """A fresh, empty database on the local Postgres; its absence is a failure (the product uses it)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    name = f"lomo_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as e:
        pytest.fail(f"Postgres at 127.0.0.1:5432 is not reachable (.ci/run starts it): {e}")
    finally:
        admin.dispose()
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_postgres_database(url: str) -> None:
    from sqlalchemy import create_engine, text

    from jobs.db import close_database

    close_database(url)
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[-1]}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    """Each service test runs on the zero-configuration SQLite and on the production Postgres."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
        yield url
        from jobs.db import close_database

        close_database(url)
        return
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Hugging Face folder (config + weights, no tokenizer): enough for job validation, not to train."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.fixture
def admin_env(tmp_path, tiny_model_dir, database_url):
    """The API on each database with the tiny model registered by name: (a client with the local admin's
    key, the settings, the model's name)."""
    from jobs.settings import Settings

    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, model_dirs=[tiny_model_dir.parent],
                        device="cpu")
    with api_client(settings) as admin:
        yield admin, settings, tiny_model_dir.name


def seed_jobs(db, specs: list[tuple[int, int]], status: str = "queued") -> list[str]:
    """Jobs of (GPUs, priority) for user "ann" on one stand-in file, created one second apart in this
    order, with ``status``: for the scheduler's and the leases' tests, which need rows, not runs."""
    from datetime import datetime, timedelta, timezone

    from jobs.models import File, Job, User

    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with db.session() as s:
        s.add(User(id="ann", name="ann"))
        s.flush()
        s.add(File(id="f", owner_id="ann", filename="d.jsonl", purpose="fine-tune", bytes=1, storage_path="x"))
        s.flush()
        ids = [f"job-{n:03d}" for n in range(len(specs))]
        s.add_all([Job(id=job_id, owner_id="ann", model="m", training_file_id="f", method="lomo", status=status,
                       gpus=gpus, priority=priority, created_at=start + timedelta(seconds=n))
                   for n, (job_id, (gpus, priority)) in enumerate(zip(ids, specs, strict=True))])
    return ids


def admin_key(settings) -> str:
    """The local admin's API key, which the service wrote at its first start."""
    return settings.admin_key_file.read_text().strip()


def user_key(settings, name: str, admin: bool = False) -> str:
    """An API key of user ``name`` of the service's database (made with the user on first use)."""
    from sqlalchemy import select

    from jobs import users
    from jobs.db import database
    from jobs.models import User

    with database(settings.resolved_database_url()).session() as session:
        found = session.scalar(select(User).where(User.name == name))
        if found is None:
            return users.create_user(session, name, admin=admin)[1].secret
        return users.add_key(session, found).secret


def open_api_client(settings, user: str | None = None, **kwargs):
    """A started TestClient of the service's app (migrations applied, the first admin key made) that sends
    an API key: the local admin's, or with ``user``, one of that (non-admin) user's. The caller closes it
    (``client.__exit__(None, None, None)``)."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    client = TestClient(create_app(settings), **kwargs)
    client.__enter__()
    client.headers["Authorization"] = f"Bearer {user_key(settings, user) if user else admin_key(settings)}"
    return client


@contextlib.contextmanager
def api_client(settings, user: str | None = None, **kwargs):
    """``open_api_client`` as a context."""
    client = open_api_client(settings, user, **kwargs)
    try:
        yield client
    finally:
        client.__exit__(None, None, None)


class Receiver:
    """An HTTP receiver on 127.0.0.1 that answers ``codes`` in turn (then 200) and keeps what it got."""

    def __init__(self, codes: list[int] | None = None, port: int = 0) -> None:
        self.codes, self.got = list(codes or []), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the standard library's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.got.append((dict(self.headers.items()), body))
                self.send_response(outer.codes.pop(0) if outer.codes else 200)
                self.end_headers()

            def log_message(self, *_args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
