"""The API's threads read models and tokenizers at once: the first reads in a fresh process (transformers'
lazy imports, not thread-safe) give every thread the answer, never an ImportError (found by
benchmarks/bench_load.py: concurrent job submissions answered 500)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import STORIES, need_shared
from tests.e2e.live_service import ROOT


def test_first_reads_from_many_threads_at_once_all_succeed():
    folder = need_shared(STORIES)
    script = textwrap.dedent(f"""
        import json, threading
        from jobs import catalog
        answers, errors = [], []
        start = threading.Barrier(8)
        def read():
            start.wait()
            try:
                size = catalog.tokenizer_size({str(folder)!r})
                answers.append((size, catalog.model_shape({str(folder)!r}).parameters))
            except Exception as e:
                errors.append(repr(e))
        threads = [threading.Thread(target=read) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(json.dumps({{"answers": answers, "errors": errors}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["errors"] == [] and len(found["answers"]) == 8
    assert {tuple(a) for a in found["answers"]} == {(512, 260032)}
