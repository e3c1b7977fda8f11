"""One launch path for any number of ranks: ``lomo train --nproc N``, the job worker, and jobs on several nodes.

``launch(config)`` starts ``torch.distributed.run --standalone --nproc_per_node N`` with this module as
each rank's program. Every rank runs ``lomo_core.train.train``; a rank that fails writes what happened
to ``<output_dir>/.ranks/rank-N.json`` (N its global rank) before it exits. torch.distributed.run stops the
other ranks as soon as one exits with an error (none waits forever in a collective), and ``launch`` raises
:class:`LaunchError` with the first rank's own message, or, for a rank that was killed, its signal.

Several nodes (``launch(config, nodes=Nodes(...))``): every node's worker calls ``launch`` with the same
config and its own ``Nodes.rank``; each starts ``torch.distributed.run --nnodes C --node_rank R
--nproc_per_node P --master_addr A --master_port PORT`` (a static rendezvous, see :class:`Nodes`), and the
``C * P`` ranks train one ZeRO-3 model (global rank = R * P + local rank). What the nodes share and how:

* ``config.output_dir`` must be the same folder on every node (shared storage), and ``config.model``,
  ``config.data`` (and ``resume_from``) must be readable at the same paths on every node.
* Node rank 0 is the launcher: it clears ``.ranks`` (before its rendezvous store exists, so strictly before
  any rank of any node runs) and writes ``launch-config.json`` and ``launch.log`` as a single node does.
  Node R > 0 writes its own ``launch-config-node-R.json`` and ``launch-node-R.log``: no file is written by
  two nodes. Global rank 0 alone writes metrics.jsonl, summary.json, memory.json, the checkpoint folder's
  shared files and the gathered model, as on one node; every rank writes its own ``zero3-rank-N.pt``.
* Error reports are ``.ranks/rank-N.json`` by global rank, so a node's :class:`LaunchError` can name a rank
  of another node (the earliest report wins: keep the nodes' clocks in sync, NTP). A rank killed by a signal
  writes nothing; its node's launch reports it (``process_killed``) and writes its ``rank-N.json`` for the
  other nodes, whose ranks only saw a closed connection: best effort, as another node's launch may have
  returned before, so the service should take the ``process_killed`` error of any node first.
* A pause: every rank of every node takes part in the pause vote each step (an all-reduce), and one rank
  seeing its node's ``pause_file`` is enough for all to checkpoint and stop, so it is enough to give the
  pause file to one node (the launcher's); a node given none still votes (never "yes").
* ``launch`` on node 0 returns the summary (or the pause's ``{"paused": step, "checkpoint": path}``) as on
  one node. A joining node returns ``{"joined": True, "node_rank": R, "nodes": C}`` (with ``"paused"`` and
  ``"checkpoint"`` added when the run paused): it does not read summary.json, which is node 0's to report.
  Both return only once every rank of every node has finished (torch.distributed.run's exit barrier).
* A node whose partners do not all arrive within ``Nodes.rendezvous_timeout_s`` fails with
  ``LaunchError(code="rendezvous_failed")``; start order does not matter within that time.

For a real cluster (the launcher sets none of these; the worker's environment passes through to the ranks):

* ``master_port`` on node 0's ``master_addr`` must be reachable from every node (the rendezvous TCPStore,
  also used by the ranks to set up their process group); after that gloo and NCCL connect every node to every
  other on ephemeral ports, so node-to-node TCP must be open, not only the master port.
* ``GLOO_SOCKET_IFNAME`` (CPU ranks) / ``NCCL_SOCKET_IFNAME`` (GPU ranks, e.g. ``eth0`` or ``^lo,docker``):
  the interface the nodes reach each other on. Without it gloo uses the address the host name resolves to,
  which is 127.0.1.1 on many Debian/Ubuntu hosts (the other nodes cannot connect), and NCCL may pick a
  docker or virtual interface.
* ``NCCL_IB_DISABLE=1`` where there is no working InfiniBand/RoCE (else ``NCCL_IB_HCA`` picks the adapters);
  ``NCCL_DEBUG=INFO`` shows which transport and interface NCCL chose; ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` for
  mismatched collectives.
* ``CUDA_VISIBLE_DEVICES`` on each node: its ``per_node`` GPUs (local rank i uses ``cuda:i``);
  ``OMP_NUM_THREADS`` defaults to the node's CPUs / ``per_node`` for CPU ranks.
* A node that vanishes (power, network) without closing its sockets is noticed by the others' collectives only
  after the process group's timeout (30 min by default): the service should stop the other nodes' launches
  (SIGTERM) when it loses a node.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lomo_core.config import TrainConfig

ERRORS_DIR = ".ranks"
#: the environment variable naming a file whose appearance asks the ranks to checkpoint and stop (a pause);
#: set but empty: this rank checks no file but takes part in the ranks' pause vote (a node given no pause file)
PAUSE_FILE_ENV = "LOMO_PAUSE_FILE"
PAUSED_FILE = "paused.json"
#: how long a node waits for all the others to arrive at the rendezvous, by default
RENDEZVOUS_TIMEOUT_S = 300


class LaunchError(RuntimeError):
    def __init__(self, message: str, code: str = "rank_failed", field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.field = code, field


@dataclass(frozen=True)
class Nodes:
    """Where a job's ranks run when they span several nodes: ``count`` nodes of ``per_node`` ranks each
    (``count * per_node == config.nproc``), this one being node ``rank`` (0 is the launcher, whose
    ``master_addr:master_port`` the others connect to).

    The rendezvous is torch.distributed.run's static one (``--node_rank``, ``--master_addr/--master_port``),
    not c10d: the service has already placed the job, so the node ranks are known before start, and with
    them which node is the launcher (it alone clears ``.ranks`` and writes ``launch.log`` and
    ``launch-config.json``; a c10d rendezvous numbers the nodes in order of arrival, known only once they
    have met) and which global ranks each node holds (global rank r runs on node r // per_node, every time,
    so the service can tell which node a failing rank ran on). c10d's elasticity (nodes joining late,
    restarts with another world size) is nothing a fixed ZeRO-3 world can use: every rank holds a
    partition. Static also needs no etcd or other store, only node 0's TCPStore on ``master_port``.

    ``rendezvous_timeout_s``: how long node 0 waits for the others to connect, and a joining node tries to
    reach node 0; past it the launch fails with ``LaunchError(code="rendezvous_failed")``. ``run_id``
    (e.g. the job's id) keeps two jobs that were given the same master address and port apart.
    An impossible placement raises ``LaunchError(code="invalid_placement")``."""

    count: int
    rank: int
    per_node: int
    master_addr: str
    master_port: int
    rendezvous_timeout_s: int = RENDEZVOUS_TIMEOUT_S
    run_id: str = "lomo"

    def __post_init__(self) -> None:
        problems = []
        if self.count < 1:
            problems.append(f"count: {self.count} nodes; at least 1")
        if not 0 <= self.rank < self.count:
            problems.append(f"rank: node rank {self.rank} is not in 0..{self.count - 1}")
        if self.per_node < 1:
            problems.append(f"per_node: {self.per_node} ranks per node; at least 1")
        if not self.master_addr:
            problems.append("master_addr: empty (node 0's address, reachable from every node)")
        if not 0 < self.master_port < 65536:
            problems.append(f"master_port: {self.master_port} is not a TCP port")
        if self.rendezvous_timeout_s < 1:
            problems.append(f"rendezvous_timeout_s: {self.rendezvous_timeout_s}; at least 1 second")
        if not re.fullmatch(r"[\w.-]+", self.run_id):
            problems.append(f"run_id: {self.run_id!r}; letters, digits, '_', '.', '-' only")
        if problems:
            raise LaunchError("invalid node placement: " + "; ".join(problems), "invalid_placement",
                              problems[0].split(":", 1)[0])

    @property
    def launcher(self) -> bool:
        return self.rank == 0

    @property
    def suffix(self) -> str:
        """What this node's own files are named with: nothing on the launcher (its files are those of a
        single-node launch), ``-node-R`` on the others."""
        return "" if self.launcher else f"-node-{self.rank}"

    def check(self, config: TrainConfig) -> None:
        if self.count * self.per_node != config.nproc:
            raise LaunchError(f"invalid node placement: {self.count} node(s) x {self.per_node} rank(s) is "
                              f"{self.count * self.per_node} ranks, but nproc={config.nproc}",
                              "invalid_placement", "nproc")


def _cpu_only(config: TrainConfig) -> bool:
    if config.device == "cpu":
        return True
    import torch

    return not torch.cuda.is_available()


def _command(config: TrainConfig, config_path: Path, progress: bool, nodes: Nodes | None) -> list[str]:
    """The torch.distributed.run command line of this node."""
    if nodes is None:
        placement = ["--standalone", "--nproc_per_node", str(config.nproc)]
    else:
        placement = ["--nnodes", str(nodes.count), "--node_rank", str(nodes.rank),
                     "--nproc_per_node", str(nodes.per_node), "--master_addr", nodes.master_addr,
                     "--master_port", str(nodes.master_port), "--rdzv_backend", "static",
                     "--rdzv_id", nodes.run_id, "--rdzv_conf", f"timeout={nodes.rendezvous_timeout_s}"]
    return [sys.executable, "-m", "torch.distributed.run", *placement,
            "-m", "lomo_core.zero3.launch", str(config_path)] + (["--progress"] if progress else [])


def launch(config: TrainConfig, progress: bool = False, log_path: Path | None = None,
           pause_file: Path | None = None, nodes: Nodes | None = None) -> dict[str, Any]:
    """Train ``config`` on ``config.nproc`` ranks; returns the run's summary (``summary.json``).

    With ``pause_file``: once that file exists, the ranks save a checkpoint together after the step in
    progress and stop; the summary is then ``{"paused": step, "checkpoint": path}``.

    With ``nodes``: this node's part of a run over ``nodes.count`` nodes (see the module's docstring); on
    a joining node (``nodes.rank > 0``) the result is ``{"joined": True, "node_rank": R, "nodes": C}``,
    plus ``paused`` and ``checkpoint`` when the run paused."""
    if nodes is not None:
        nodes.check(config)
    suffix = nodes.suffix if nodes is not None else ""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    errors = out / ERRORS_DIR
    if nodes is None or nodes.launcher:
        # a joining node's ranks start only once the launcher's rendezvous store is up: after this
        shutil.rmtree(errors, ignore_errors=True)
    config_path = out / f"launch-config{suffix}.json"
    partial = config_path.with_name(f".{config_path.name}.partial")
    partial.write_text(config.model_dump_json(indent=2))
    os.replace(partial, config_path)  # whole or absent for its ranks
    per_node = nodes.per_node if nodes is not None else config.nproc
    env = dict(os.environ)
    if _cpu_only(config):
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU ranks, gloo between them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // per_node)))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop(PAUSE_FILE_ENV, None)
    if pause_file is not None:
        env[PAUSE_FILE_ENV] = str(pause_file)
    elif nodes is not None:
        env[PAUSE_FILE_ENV] = ""  # the pause vote is a collective: every node's ranks take part
    cmd = _command(config, config_path, progress, nodes)
    log_path = log_path or out / f"launch{suffix}.log"
    offset = log_path.stat().st_size if log_path.is_file() else 0  # an earlier launch's lines are not ours
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
        raise _failure(errors, log_path, returncode, offset, nodes)
    paused = json.loads((errors / PAUSED_FILE).read_text()) if (errors / PAUSED_FILE).is_file() else None
    if nodes is not None and not nodes.launcher:
        # exit status 0: the launcher cleared .ranks before we met, so a paused.json is this run's
        return {"joined": True, "node_rank": nodes.rank, "nodes": nodes.count, **(paused or {})}
    if paused is not None:
        return paused
    return json.loads((out / "summary.json").read_text())


def _rendezvous_error(text: str) -> str | None:
    """torch.distributed.run's own error when the nodes did not all meet (its traceback passes through the
    rendezvous handler's ``next_rendezvous``, before any rank starts): the exception's line."""
    at = text.rfind("in next_rendezvous")
    if at < 0:
        return None
    found = re.search(r"^(?:[A-Za-z_][\w.]*\.)?(\w+(?:Error|Exception|Timeout)): (.*)$", text[at:], re.M)
    return f"{found.group(1)}: {found.group(2)}" if found else "the rendezvous failed"


def _failure(errors: Path, log_path: Path, returncode: int, offset: int = 0,
             nodes: Nodes | None = None) -> LaunchError:
    """The root cause: a rank killed by a signal (the others then fail on the lost connection, or are
    stopped by torch.distributed.run with SIGTERM), else a rendezvous that failed (no rank started), else the
    first error a rank reported itself (a rank of any node: the reports are in the shared output_dir)."""
    text = ""
    if log_path.is_file():
        with log_path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    exits = re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", text)
    killed = [(rank, int(code)) for rank, code in exits if int(code) < 0 and int(code) != -15]
    if killed:
        rank, code = killed[0]
        hint = " (SIGKILL: often the host's out-of-memory killer)" if code == -9 else ""
        if nodes is not None:  # for the other nodes, whose ranks only saw a connection closed by this one
            _report(errors, {"rank": int(rank), "code": "process_killed", "time": time.time(),
                             "message": f"killed by signal {-code}{hint} on node {nodes.rank}. Log: {log_path}"})
        return LaunchError(f"rank {rank} was killed by signal {-code}{hint}; the other ranks were stopped. "
                           f"Log: {log_path}", "process_killed")
    rendezvous = _rendezvous_error(text)
    if rendezvous is not None:  # before the reports: on a joining node, .ranks may be an earlier attempt's
        if nodes is None:
            return LaunchError(f"the ranks could not meet ({rendezvous}). Log: {log_path}", "rendezvous_failed")
        waited = "the other nodes did not all connect to it" if nodes.launcher else "it could not reach node 0"
        return LaunchError(
            f"node {nodes.rank} of {nodes.count}: {waited} at {nodes.master_addr}:{nodes.master_port} within "
            f"{nodes.rendezvous_timeout_s} s ({rendezvous}). Every node's launch needs the same master address and "
            f"port, node 0 must be able to listen on that port, and the others must reach it. Log: {log_path}",
            "rendezvous_failed")
    # a rank killed on another node, as that node's launch reported it, comes first: the ranks that lost
    # their connection to it failed after it, whatever their clocks say
    reports = sorted(_reports(errors), key=lambda r: (r["code"] != "process_killed", r["time"]))
    if reports:
        first = reports[0]
        return LaunchError(f"rank {first['rank']}: {first['message']}", first["code"], first.get("field"))
    return LaunchError(f"the ranks exited with status {returncode}; see {log_path}")


def _reports(errors: Path) -> list[dict[str, Any]]:
    found = []
    for path in errors.glob("rank-*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # gone, or not readable: another report names the cause
            continue
    return found


def _report(errors: Path, report: dict[str, Any], replace: bool = False) -> None:
    """Write a rank's error report ``rank-N.json``, whole or not at all (another node may be reading the
    folder); without ``replace``, not over the report the rank wrote itself."""
    errors.mkdir(parents=True, exist_ok=True)
    path = errors / f"rank-{report['rank']}.json"
    if replace or not path.exists():
        partial = errors / f".{path.name}.partial"
        partial.write_text(json.dumps(report, indent=2))
        os.replace(partial, path)


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
        should_pause = None if pause_file is None else (lambda: bool(pause_file) and Path(pause_file).exists())
        try:
            train(config, sinks=sinks, should_pause=should_pause)
        except Paused as paused:  # every rank saved its part of the checkpoint and stops here
            if rank == 0:
                folder = Path(config.output_dir) / ERRORS_DIR
                folder.mkdir(parents=True, exist_ok=True)
                (folder / PAUSED_FILE).write_text(json.dumps({"paused": paused.step,
                                                              "checkpoint": str(paused.checkpoint)}))
    except BaseException as error:
        from lomo_core.errors import classify

        report = {**classify(error), "rank": rank, "time": time.time(), "traceback": traceback.format_exc()}
        _report(Path(config.output_dir) / ERRORS_DIR, report, replace=True)
        traceback.print_exc()
        return 1
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
