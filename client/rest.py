"""A typed client of the REST API, for scripts and job queues (the demo uses it).

    client = LomoClient("http://127.0.0.1:8000")
    file = client.upload_file("train.jsonl")
    job = client.create_job(model="stories260K", training_file=file["id"], hyperparameters={"max_steps": 50})
    job = client.wait(job["id"])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

FINAL = ("succeeded", "failed", "cancelled")


class ApiError(RuntimeError):
    """An error answer of the service: ``status``, ``code``, ``param`` and the per-field ``details``."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.code = error.get("code", "http_error")
        self.param = error.get("param")
        self.details = error.get("details", [])
        super().__init__(f"{status} {self.code}: {error.get('message', body)}")


class LomoClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LomoClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"error": {"message": response.text}}
            raise ApiError(response.status_code, body)
        return response.json()

    # ------------------------------------------------------------------------------------------ files
    def upload_file(self, path: str | Path, purpose: str = "fine-tune") -> dict[str, Any]:
        path = Path(path)
        with path.open("rb") as f:
            return self._call("POST", "/v1/files", files={"file": (path.name, f)}, data={"purpose": purpose})

    def list_files(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/files")["data"]

    def delete_file(self, file_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/files/{file_id}")

    # ------------------------------------------------------------------------------------------ jobs
    def create_job(self, model: str, training_file: str, **fields: Any) -> dict[str, Any]:
        body = {"model": model, "training_file": training_file, **fields}
        return self._call("POST", "/v1/fine_tuning/jobs", json=body)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/fine_tuning/jobs/{job_id}")

    def list_jobs(self, limit: int = 20, after: str | None = None, status: str | None = None,
                  metadata: dict[str, str] | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        if status:
            params["status"] = status
        for key, value in (metadata or {}).items():
            params[f"metadata[{key}]"] = value
        return self._call("GET", "/v1/fine_tuning/jobs", params=params)

    def iter_jobs(self, **filters: Any) -> Iterator[dict[str, Any]]:
        after = None
        while True:
            page = self.list_jobs(after=after, **filters)
            yield from page["data"]
            if not page["has_more"]:
                return
            after = page["data"][-1]["id"]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")

    def events(self, job_id: str, limit: int = 100, after: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        return self._call("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params=params)

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints")["data"]

    def metrics(self, job_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        points, after = [], None
        while True:
            params: dict[str, Any] = {"limit": 10000}
            if kind:
                params["kind"] = kind
            if after is not None:
                params["after_step"] = after
            page = self._call("GET", f"/v1/fine_tuning/jobs/{job_id}/metrics", params=params)
            points += page["data"]
            if not page["has_more"] or not page["data"]:
                return points
            after = page["data"][-1]["step"]

    def memory(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/fine_tuning/jobs/{job_id}/memory")

    def evals(self, job_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/fine_tuning/jobs/{job_id}/evals")["data"]

    def wait(self, job_id: str, timeout: float = 3600.0, poll: float = 1.0,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job has ended; ``on_update`` sees every state of the job object."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_update:
                on_update(job)
            if job["status"] in FINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f}s")
            time.sleep(poll)
