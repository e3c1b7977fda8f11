"""The lab's web portal, served by the API itself at ``/`` (same process, port and users): jobs, a job's
curves, memory, events and scores, the new-job form with its memory prediction, comparisons, the cluster,
files and models. Pages are rendered on the server (Jinja2) with small live swaps (htmx); charts are
Chart.js. Every asset is vendored under ``static/`` (``static/vendor/MANIFEST`` lists their sources and
checksums), so no page needs the internet, and the Content-Security-Policy keeps every request on this host.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles

from api.portal import auth, newjob, pages
from api.portal.render import HERE


def install(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(auth.SignInRequired)
    async def _sign_in(request: Request, _exc: auth.SignInRequired):
        return auth.sign_in_redirect(request)

    for module in (auth, newjob, pages):  # newjob before pages: /jobs/new is not a job id
        app.include_router(module.router)
