"""A typed client of the REST API, for scripts and job queues (the demo and the `lomo` CLI use it).

    client = LomoClient("http://127.0.0.1:8000")            # api_key="..." sends Authorization: Bearer
    file = client.upload_file("train.jsonl")
    job = client.create_job(model="stories260K", training_file=file["id"], method={
        "type": "supervised", "supervised": {"hyperparameters": {"max_steps": 50}}})
    job = client.wait(job["id"])

An answer of 400 or more raises :class:`ApiError` (status, code, param, details); a service that cannot
be reached (connection refused, timeout) raises :class:`ServiceUnreachable`, naming the URL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

FINAL = ("succeeded", "failed", "cancelled")


class ApiError(RuntimeError):
    """An error answer of the service: ``status``, ``code``, ``param``, the per-field ``details`` (each
    ``{"param", "message", "line"}``), the server's ``message`` and the ``request`` ("POST /v1/files")."""

    def __init__(self, status: int, body: dict[str, Any], request: str | None = None) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        if not isinstance(error, dict):
            error = {"message": str(error)}
        self.status = status
        self.code = error.get("code") or "http_error"
        self.param = error.get("param")
        self.details = error.get("details") or []
        self.message = str(error.get("message", body))
        self.request = request
        super().__init__(f"{status} {self.code}: {self.message}")


class ServiceUnreachable(ConnectionError):
    """No answer from the service at ``url``: connection refused, a timeout, a name that does not resolve."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, reason
        super().__init__(f"cannot reach the service at {url}: {reason}")


class LomoClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LomoClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:  # refused, timed out, unresolvable: no answer at all
            raise ServiceUnreachable(self.base_url, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) \
                from e
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"error": {"message": response.text or response.reason_phrase}}
            raise ApiError(response.status_code, body, request=f"{method} {path}")
        return response.json()

    # ------------------------------------------------------------------------------------------ files
    def upload_file(self, path: str | Path, purpose: str = "fine-tune") -> dict[str, Any]:
        path = Path(path)
        with path.open("rb") as f:
            return self._call("POST", "/v1/files", files={"file": (path.name, f)}, data={"purpose": purpose})

    def list_files(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """Every uploaded file (of ``purpose``), newest first, all pages."""
        return list(self._pages("/v1/files", {"purpose": purpose} if purpose else {}))

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The items of a listing, page after page (``after`` = the last id, while ``has_more``)."""
        after = None
        while True:
            page = self._call("GET", path, params={**params, **({"after": after} if after else {})})
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            after = page["data"][-1]["id"]

    def get_file(self, file_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/files/{file_id}")

    def delete_file(self, file_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/files/{file_id}")

    # ------------------------------------------------------------------------------------------ jobs
    def create_job(self, model: str, training_file: str, idempotency_key: str | None = None,
                   **fields: Any) -> dict[str, Any]:
        """``POST /v1/fine_tuning/jobs`` with ``fields`` as the rest of the body, as given (``method``,
        ``seed``, ``metadata``, ...). A repeated ``idempotency_key`` answers the job it first created."""
        body = {"model": model, "training_file": training_file, **fields}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._call("POST", "/v1/fine_tuning/jobs", json=body, headers=headers)

    def estimate(self, model: str, training_file: str | None = None, **fields: Any) -> dict[str, Any]:
        """``POST /v1/estimates``: the body of a job; the predicted memory per device, the GPU count, whether
        it fits. Nothing is created."""
        body = {"model": model, **({"training_file": training_file} if training_file else {}), **fields}
        return self._call("POST", "/v1/estimates", json=body)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/fine_tuning/jobs/{job_id}")

    @staticmethod
    def _job_filters(limit: int, status: str | None, metadata: dict[str, str] | None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        for key, value in (metadata or {}).items():
            params[f"metadata[{key}]"] = value
        return params

    def list_jobs(self, limit: int = 20, after: str | None = None, status: str | None = None,
                  metadata: dict[str, str] | None = None) -> dict[str, Any]:
        """One page of jobs, newest first."""
        params = self._job_filters(limit, status, metadata)
        return self._call("GET", "/v1/fine_tuning/jobs", params={**params, **({"after": after} if after else {})})

    def iter_jobs(self, status: str | None = None, metadata: dict[str, str] | None = None,
                  page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every job (with the filters), newest first, page after page."""
        yield from self._pages("/v1/fine_tuning/jobs", self._job_filters(page_size, status, metadata))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")

    def pause_job(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/fine_tuning/jobs/{job_id}/pause")

    def resume_job(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/fine_tuning/jobs/{job_id}/resume")

    def events(self, job_id: str, limit: int = 100, after: str | int | None = None) -> dict[str, Any]:
        """One page of the job's events, newest first; ``after`` is the last event id of the previous page."""
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        return self._call("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params=params)

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """Every checkpoint the job keeps, newest first, all pages."""
        return list(self._pages(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", {"limit": 100}))

    def metrics(self, job_id: str, kind: str | None = None, after_step: int | None = None) -> list[dict[str, Any]]:
        """Every metric point (``kind`` train or val) after ``after_step``, in step order."""
        points, after = [], after_step
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
        """Every evaluation score of the job (base, checkpoints, fine-tuned), all pages."""
        return list(self._pages(f"/v1/fine_tuning/jobs/{job_id}/evals", {"limit": 1000}))

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

    # ------------------------------------------------------------------------------------------ models
    def list_models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the registered base models and your fine-tuned models."""
        return self._call("GET", "/v1/models")["data"]

    def get_model(self, name: str) -> dict[str, Any]:
        from urllib.parse import quote

        return self._call("GET", f"/v1/models/{quote(name, safe=':')}")

    def register_model(self, name: str, path: str | Path) -> dict[str, Any]:
        """``POST /v1/admin/models`` (admins): register a model folder of the service's host by name."""
        return self._call("POST", "/v1/admin/models", json={"name": name, "path": str(path)})

    def me(self) -> dict[str, Any]:
        """``GET /v1/me``: the key's user, their quotas and what they use of them."""
        return self._call("GET", "/v1/me")

    def cluster(self, hours: float = 24.0) -> dict[str, Any]:
        """``GET /v1/cluster``: the nodes and who holds their GPUs, the queue in the order it runs, and the
        GPU leases of the last ``hours`` (other users' job ids are null, but for admins)."""
        return self._call("GET", "/v1/cluster", params={"hours": hours})

    def delete_model(self, name: str) -> dict[str, Any]:
        """Delete one of your fine-tuned models (its files and checkpoints; the job stays)."""
        from urllib.parse import quote

        return self._call("DELETE", f"/v1/models/{quote(name, safe=':')}")

    def download_model(self, name: str, dest_dir: str | Path) -> Path:
        """Stream ``GET /v1/models/{name}/content`` (a tar archive of one folder: a fine-tuned model's or a
        checkpoint's weights, config and tokenizer) and unpack it into ``dest_dir`` as it arrives; returns
        the model's folder there, ready for ``from_pretrained``.

        Only regular files and folders are unpacked: a member with an absolute path or a '..' part, or a
        link, raises ValueError when it is reached, and nothing is ever written outside ``dest_dir``."""
        import shutil
        import tarfile
        from urllib.parse import quote

        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        base = dest.resolve()
        path = f"/v1/models/{quote(name, safe=':')}/content"
        roots: set[str] = set()
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    try:
                        body = response.json()
                    except ValueError:
                        body = {"error": {"message": response.text or response.reason_phrase}}
                    raise ApiError(response.status_code, body, request=f"GET {path}")
                with tarfile.open(fileobj=self._ByteStream(response.iter_bytes()), mode="r|") as archive:
                    for member in archive:
                        target, root = self._archive_target(base, member)
                        roots.add(root)
                        if member.isdir():
                            target.mkdir(parents=True, exist_ok=True)
                            continue
                        target.parent.mkdir(parents=True, exist_ok=True)
                        source = archive.extractfile(member)
                        with target.open("wb") as out:
                            shutil.copyfileobj(source, out, 1 << 20)
        except httpx.TransportError as e:
            raise ServiceUnreachable(self.base_url, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) \
                from e
        return base / roots.pop() if len(roots) == 1 else base

    @staticmethod
    def _archive_target(base: Path, member: Any) -> tuple[Path, str]:
        """Where an archive member goes under ``base`` (and its first path part); ValueError for a member
        that is not a plain file or folder, or whose path leaves ``base``."""
        from pathlib import PurePosixPath

        name = PurePosixPath(member.name)
        if not (member.isfile() or member.isdir()):
            raise ValueError(f"the archive has {member.name!r}, which is not a file or a folder; refused")
        if name.is_absolute() or ".." in name.parts or not name.parts or "\\" in member.name:
            raise ValueError(f"the archive has a member outside its folder ({member.name!r}); refused")
        target = (base / Path(*name.parts)).resolve()
        if not target.is_relative_to(base) or target == base:
            raise ValueError(f"the archive has a member outside its folder ({member.name!r}); refused")
        return target, name.parts[0]

    class _ByteStream:
        """A read-only file over an iterator of byte chunks (what ``tarfile``'s stream mode reads)."""

        def __init__(self, chunks: Iterator[bytes]) -> None:
            self._chunks, self._buffer = chunks, bytearray()

        def read(self, size: int = -1) -> bytes:
            while size < 0 or len(self._buffer) < size:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._buffer += chunk
            if size < 0:
                size = len(self._buffer)
            out = bytes(self._buffer[:size])
            del self._buffer[:size]
            return out
