"""One launch path for any number of ranks: ``lomo train --nproc N`` (and, later, the job worker).

``launch(config)`` starts ``torch.distributed.run --standalone --nproc_per_node N`` with this module as
each rank's program. Every rank runs ``lomo_core.train.train``; a rank that fails writes what happened
to ``<output_dir>/.ranks/rank-N.json`` before it exits. torch.distributed.run stops the other ranks as
soon as one exits with an error (none waits forever in a collective), and ``launch`` raises
:class:`LaunchError` with the first rank's own message, or, for a rank that was killed, its signal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from lomo_core.config import TrainConfig

ERRORS_DIR = ".ranks"
#: the environment variable naming a file whose appearance asks the ranks to checkpoint and stop (a pause)
PAUSE_FILE_ENV = "LOMO_PAUSE_FILE"
PAUSED_FILE = "paused.json"


class LaunchError(RuntimeError):
    def __init__(self, message: str, code: str = "rank_failed", field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.field = code, field


def _cpu_only(config: TrainConfig) -> bool:
    if config.device == "cpu":
        return True
    import torch

    return not torch.cuda.is_available()


def launch(config: TrainConfig, progress: bool = False, log_path: Path | None = None,
           pause_file: Path | None = None) -> dict[str, Any]:
    """Train ``config`` on ``config.nproc`` ranks; returns the run's summary (``summary.json``).

    With ``pause_file``: once that file exists, the ranks save a checkpoint together after the step in
    progress and stop; the summary is then ``{"paused": step, "checkpoint": path}``."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    errors = out / ERRORS_DIR
    shutil.rmtree(errors, ignore_errors=True)
    config_path = out / "launch-config.json"
    config_path.write_text(config.model_dump_json(indent=2))
    env = dict(os.environ)
    if _cpu_only(config):
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU ranks, gloo between them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.nproc)))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop(PAUSE_FILE_ENV, None)
    if pause_file is not None:
        env[PAUSE_FILE_ENV] = str(pause_file)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(config.nproc),
           "-m", "lomo_core.zero3.launch", str(config_path)] + (["--progress"] if progress else [])
    log_path = log_path or out / "launch.log"
    with log_path.open("ab") as log:
        # Everything goes to the log (torch.distributed.run's summary of failed ranks included); with
        # progress, the ranks' stderr (rank 0's progress bar) is also copied to this process's stderr.
        child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.PIPE)
        assert child.stderr is not None
        for chunk in iter(lambda: child.stderr.read1(1 << 14), b""):
            log.write(chunk)
            if progress:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
        returncode = child.wait()
    if returncode != 0:
        raise _failure(errors, log_path, returncode)
    if (errors / PAUSED_FILE).is_file():
        return json.loads((errors / PAUSED_FILE).read_text())
    return json.loads((out / "summary.json").read_text())


def _failure(errors: Path, log_path: Path, returncode: int) -> LaunchError:
    """The root cause: a rank killed by a signal (the others then fail on the lost connection, or are
    stopped by torch.distributed.run with SIGTERM), else the first error a rank reported itself."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    exits = re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", text)
    killed = [(rank, int(code)) for rank, code in exits if int(code) < 0 and int(code) != -15]
    if killed:
        rank, code = killed[0]
        hint = " (SIGKILL: often the host's out-of-memory killer)" if code == -9 else ""
        return LaunchError(f"rank {rank} was killed by signal {-code}{hint}; the other ranks were stopped. "
                           f"Log: {log_path}", "process_killed")
    reports = sorted((json.loads(p.read_text()) for p in errors.glob("rank-*.json")), key=lambda r: r["time"])
    if reports:
        first = reports[0]
        return LaunchError(f"rank {first['rank']}: {first['message']}", first["code"], first.get("field"))
    return LaunchError(f"the ranks exited with status {returncode}; see {log_path}")


def _rank_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="one rank of `lomo train --nproc N`")
    parser.add_argument("config")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    config = TrainConfig.model_validate_json(Path(args.config).read_text())
    try:
        from lomo_core.train import Paused, train

        sinks = []
        if args.progress and rank == 0:
            from rich.console import Console

            from lomo_core.metrics import ProgressBarSink

            sinks.append(ProgressBarSink(console=Console(stderr=True)))
        pause_file = os.environ.get(PAUSE_FILE_ENV)
        try:
            train(config, sinks=sinks, should_pause=(lambda: Path(pause_file).exists()) if pause_file else None)
        except Paused as paused:  # every rank saved its part of the checkpoint and stops here
            if rank == 0:
                folder = Path(config.output_dir) / ERRORS_DIR
                folder.mkdir(parents=True, exist_ok=True)
                (folder / PAUSED_FILE).write_text(json.dumps({"paused": paused.step,
                                                              "checkpoint": str(paused.checkpoint)}))
    except BaseException as error:
        from lomo_core.errors import classify

        report = {**classify(error), "rank": rank, "time": time.time(), "traceback": traceback.format_exc()}
        folder = Path(config.output_dir) / ERRORS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{rank}.json").write_text(json.dumps(report, indent=2))
        traceback.print_exc()
        return 1
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
