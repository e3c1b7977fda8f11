"""The GPU scheduler at scale, by simulation: a synthetic lab trace replayed through the real rule.

Not in CI. Three parts, one Markdown report (``--out``):

1. **Trace.** A seeded synthetic lab trace: Poisson arrivals with a day/night cycle, LLaMA 7B / 13B / 30B /
   65B jobs (many small, few large) whose GPU counts and predicted peak per GPU come from the service's own
   memory model (``lomo_core.memory_model.place`` on 24 GiB RTX 3090 cards, as ``jobs.admission`` calls it,
   with LLaMA configs built from the published shapes on the meta device: no weights), mixed priorities,
   lognormal (heavy-tailed, capped) run times scaled so that the offered load is ``--load`` (0.9) of the
   GPUs.
2. **Simulation.** A discrete-event simulation of N nodes x 8 GPUs. At every event (an arrival, a job's
   end, a preempted job's checkpoint done, a running job passing the preemption's minimum run time) each
   node's worker decides as ``jobs.scheduler._start_next`` does: the real ``choose`` over the queue in its
   real order (priority, then first come), with the real ``bypassed`` counts, ``backfill_limit``, the GPUs
   held for a job being preempted for, and each job's ``held_on`` (the node that holds GPUs for it once
   it is at the limit: ``choose`` is told the deciding node, lets it backfill past a job held on another
   one, and a ``held_for`` answer that is not a preemption's target makes the deciding node the job's
   ``held_on`` where it was none or this node; no node is ever lost here, so it never passes to
   another); with preemption on, the real ``preemption_victims`` with ``preempt_min_run_s``, one
   preemption at a time per waiting job, the preempted job checkpointing, freeing its GPUs and going back
   to its place in the queue. A job's GPUs are all on one node. Against ``backfill_limit`` 0 ("strict
   FIFO": on one node the head of the queue starts before anything behind it; on several, each node
   holds for the first job that no other node holds for) and one job at a time per node (LLaMA-Factory's
   board). Reported: GPU utilisation, p50 / p95 wait by job size, makespan, preemptions, backfills, GPUs
   left idle while jobs waited, against the previous report's figures (``PREVIOUS``: the rule before
   commit adc7e3f, where every node where a job at the limit fits held for it).
3. **Decision time.** ``choose`` alone, and the real database path ``jobs.scheduler.start_next`` (choose,
   claim and lease in one transaction) on a Postgres database of its own (``lomo_bench_sched``, created and
   dropped here) holding 100 / 1,000 / 10,000 queued jobs, with quotas off and on: median and p99 against
   the workers' wake-up interval (``requeue_delay_s``).

    .venv/bin/python benchmarks/bench_scheduler.py --out docs/benchmarks-scheduler.md   # about 2 min on 2 cores
    .venv/bin/python benchmarks/bench_scheduler.py --quick --out /tmp/sched.md          # about 20 s
    .venv/bin/python benchmarks/bench_scheduler.py --no-db                               # the simulation only

Postgres at 127.0.0.1:5432 (trust auth, user postgres), as the tests use it.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from jobs.scheduler import Choice, Running, Waiting, choose, fits_node, preemption_victims  # noqa: E402
from jobs.settings import Settings  # noqa: E402

GiB = 1024**3
HOUR, DAY, WEEK = 3600.0, 86400.0, 7 * 86400.0
NODE_GPUS = 8
CARD_GIB = 24  # RTX 3090
DEVICE_BYTES = CARD_GIB * GiB  # as Settings.device_inventory() gives it for LOMO_GPU_MEMORY_GIB=[24, ...]
DEFAULTS = Settings()  # the service's defaults: backfill_limit, preempt_min_run_s, requeue_delay_s
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "lomo_bench_sched"

# ------------------------------------------------------------------------------------------------ the jobs
#: LLaMA (v1) shapes: hidden, intermediate, layers, heads (vocabulary 32,000, untied, multi-head attention)
LLAMA = {"7B": (4096, 11008, 32, 32), "13B": (5120, 13824, 40, 40), "30B": (6656, 17920, 60, 52),
         "65B": (8192, 22016, 80, 64)}
SIZES = tuple(LLAMA)
#: the training settings every job of the trace predicts its memory with (the LOMO paper's recipe)
TRAIN = {"optimizer": "lomo", "dtype": "bf16", "batch_size": 8, "seq_len": 512, "gradient_checkpointing": True,
         "loss_chunk_size": None, "device": "cuda"}
#: the share of each size among the jobs: many small, few large
MIX = {"7B": 0.55, "13B": 0.25, "30B": 0.13, "65B": 0.07}
#: median run time (hours, on its GPUs) per size, lognormal with ``SIGMA``, between ``MIN_RUN_H`` and ``CAP_H``
MEDIAN_H = {"7B": 0.75, "13B": 1.0, "30B": 1.5, "65B": 2.5}
SIGMA, MIN_RUN_H, CAP_H = 1.2, 5 / 60, 24.0
#: priorities (value, share): most jobs 0, some higher
PRIORITIES = ((0, 0.85), (1, 0.10), (2, 0.05))
#: day/night cycle: the arrival rate is (1 + DAY_SWING * cos(2 pi (hour - PEAK_HOUR) / 24)) x the mean
DAY_SWING, PEAK_HOUR = 0.6, 14.0
#: preemption costs (s): checkpointing after the step in progress (GPUs still held), and a restart (model
#: load and resume from the checkpoint, added to the run); assumptions, scaled with the model's size
PAUSE_S = {"7B": 60.0, "13B": 90.0, "30B": 150.0, "65B": 300.0}
RESTART_S = {"7B": 120.0, "13B": 180.0, "30B": 300.0, "65B": 600.0}
EPOCH = datetime(2026, 1, 5, tzinfo=timezone.utc)  # a Monday, 00:00: the trace's time 0


@dataclass(frozen=True)
class Shape:
    size: str
    parameters: int
    gpus: int
    peak_bytes: int  # predicted peak per GPU on those GPUs


def job_shapes() -> dict[str, Shape]:
    """GPU count and predicted peak of each size, from the service's memory model (as ``jobs.admission``
    predicts a job's memory on a deployment of 8 x 24 GiB GPUs)."""
    from lomo_core.memory_model import model_shape, place

    shapes = {}
    for size, (hidden, intermediate, layers, heads) in LLAMA.items():
        shape = model_shape({"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
                             "num_hidden_layers": layers, "num_attention_heads": heads,
                             "num_key_value_heads": heads, "vocab_size": 32000, "max_position_embeddings": 2048,
                             "tie_word_embeddings": False, "rms_norm_eps": 1e-6})
        placement = place(shape, DEVICE_BYTES, NODE_GPUS, **TRAIN)
        if not placement.fits:
            raise SystemExit(f"LLaMA-{size} does not fit on {NODE_GPUS} x {CARD_GIB} GiB: {placement.reason}")
        shapes[size] = Shape(size, shape.parameters, placement.gpus, placement.estimate.peak_bytes)
    return shapes


@dataclass(frozen=True)
class TraceJob:
    id: str
    size: str
    gpus: int
    peak_bytes: int
    priority: int
    arrival: float  # s since the trace's start
    work: float  # s of training on its GPUs


def _weighted(rng: random.Random, pairs) -> object:
    x, acc = rng.random(), 0.0
    for value, weight in pairs:
        acc += weight
        if x < acc:
            return value
    return pairs[-1][0]


def _lognormal_mean(median: float) -> float:
    return median * math.exp(SIGMA**2 / 2)


def make_trace(seed: int, shapes: dict[str, Shape], gpus_total: int, load: float,
               horizon: float | None = None, jobs: int | None = None) -> list[TraceJob]:
    """Arrivals over ``horizon`` seconds (or the first ``jobs`` of them), the run times then scaled so that
    the offered load (GPU-seconds of work over the GPU-seconds of the arrival span) is exactly ``load``."""
    rng = random.Random(seed)
    gpu_s_per_job = sum(MIX[s] * shapes[s].gpus * _lognormal_mean(MEDIAN_H[s] * HOUR) for s in SIZES)
    rate = load * gpus_total / gpu_s_per_job  # mean arrivals per second
    peak = rate * (1 + DAY_SWING)
    out: list[TraceJob] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if horizon is not None and t > horizon:
            break
        hour = (t % DAY) / HOUR
        if rng.random() * (1 + DAY_SWING) > 1 + DAY_SWING * math.cos(2 * math.pi * (hour - PEAK_HOUR) / 24):
            continue  # thinning: a non-homogeneous Poisson process
        size = _weighted(rng, tuple(MIX.items()))
        work = rng.lognormvariate(math.log(MEDIAN_H[size] * HOUR), SIGMA)
        out.append(TraceJob(f"j{len(out):05d}", size, shapes[size].gpus, shapes[size].peak_bytes,
                            _weighted(rng, PRIORITIES), t, min(max(work, MIN_RUN_H * HOUR), CAP_H * HOUR)))
        if jobs is not None and len(out) >= jobs:
            break
    span = horizon if horizon is not None else out[-1].arrival
    for _ in range(20):  # one factor for all, the bounds kept: a few rounds converge
        scale = load * gpus_total * span / sum(j.gpus * j.work for j in out)
        out = [replace(j, work=min(max(j.work * scale, MIN_RUN_H * HOUR), CAP_H * HOUR)) for j in out]
        if abs(scale - 1) < 1e-4:
            break
    return out


# ------------------------------------------------------------------------------------------- the policies
@dataclass(frozen=True)
class Policy:
    name: str
    kind: str  # "rule": jobs.scheduler's choose (and preemption_victims); "one": one job per node at a time
    backfill_limit: int = DEFAULTS.backfill_limit
    preempt: bool = False
    min_run_s: float = DEFAULTS.preempt_min_run_s
    note: str = ""


UNBOUNDED = 10**9
POLICIES = (
    Policy("lomo (defaults)", "rule", note=f"the real rule as deployed by default: backfill_limit "
                                           f"{DEFAULTS.backfill_limit}, no preemption"),
    Policy("lomo + preemption", "rule", preempt=True,
           note=f"LOMO_PREEMPT=1, preempt_min_run_s {DEFAULTS.preempt_min_run_s:.0f} s"),
    Policy("backfill unbounded", "rule", backfill_limit=UNBOUNDED,
           note="the real rule with no backfill limit: what the limit protects against"),
    Policy("strict FIFO", "rule", backfill_limit=0,
           note="backfill_limit 0: on one node the head of the queue starts before anything behind it; on "
                "several, each node starts (or holds its GPUs for) the first job that no other node holds for"),
    Policy("one job per node", "one", note="a node runs one job at a time, whatever its size (LLaMA-Factory's "
                                           "board); the first job of the queue starts when the node is idle"),
)

#: the previous report's figures (docs/benchmarks-scheduler.md as of commit 431641d: the default run, before
#: commit adc7e3f gave each job at the backfill limit one holding node, ``held_on``), to say what changed
PREVIOUS_REV = "431641d"
PREVIOUS_ARGS = {"seeds": 8, "jobs": 10_000, "nodes": 8, "load": 0.9}  # the run they are comparable with
#: policy: (1 node: utilisation, all p95 wait h; 8 nodes: utilisation, all p95 wait h, GPU-h held idle for a
#: job; 8 nodes at 70% load: all p95, 7B p95, 65B p95 wait h)
PREVIOUS = {
    "lomo (defaults)": (0.731, 58.9, 0.832, 63.9, 10654, 6.9, 6.6, 9.1),
    "lomo + preemption": (0.715, 71.9, 0.837, 78.3, 10617, 8.1, 7.9, 10.4),
    "backfill unbounded": (0.786, 22.3, 0.867, 7.9, 0, 1.5, 5 / 60, 12.5),
    "strict FIFO": (0.726, 62.3, 0.816, 87.0, 12508, 8.1, 8.0, 9.8),
    "one job per node": (0.373, 253.6, 0.353, 1579.4, 0, None, None, None),
}
#: 8 nodes, defaults: GPU-h held idle on nodes other than the one the job then started on, of the GPU-h held,
#: the most nodes that held for one job at once, and the GPU-h held of the GPU-h used
PREVIOUS_HELD = (9167, 10654, 8, 0.169)
#: 8 nodes, with preemption: preemptions, victims whose job then started on another node, victims paused
#: while another node had the GPUs free
PREVIOUS_PREEMPT = (1219, 710, 594)
#: 8 nodes at 90% load: 65B p95 wait (h), unbounded backfill and defaults
PREVIOUS_65B = (45.3, 65.4)

# ------------------------------------------------------------------------------------------ the simulator
@dataclass
class SimJob:
    spec: TraceJob
    remaining: float  # s of work left (a restart's overhead added after a preemption)
    status: str = "pending"  # pending | queued | running | pausing | done
    node: int | None = None
    run_start: float = 0.0
    first_start: float | None = None
    end: float | None = None
    token: int = 0  # invalidates the end event of a run that was preempted
    bypassed: int = 0  # as the jobs.bypassed column: never reset
    held_on: str | None = None  # as the jobs.held_on column: the node that holds for it; never reset
    preempted_by: str | None = None
    preemptions: int = 0

    @property
    def key(self) -> tuple:  # the queue's order: priority (higher first), then first come (created_at), id
        return (-self.spec.priority, self.spec.arrival, self.spec.id)

    def waiting(self) -> Waiting:
        return Waiting(self.spec.id, self.spec.gpus, self.bypassed, self.spec.peak_bytes, self.spec.priority,
                       held_on=self.held_on)


@dataclass
class Node:
    index: int
    size: int = NODE_GPUS
    free: int = NODE_GPUS
    jobs: dict[str, SimJob] = field(default_factory=dict)  # running and pausing jobs on it
    holding: str | None = None  # the job its free GPUs are held for, after its last decision

    @property
    def name(self) -> str:  # as the nodes table and Job.held_on name it
        return f"node-{self.index}"

    @property
    def leased(self) -> int:
        return self.size - self.free


@dataclass
class Result:
    policy: Policy
    nodes: int
    jobs: list[SimJob]
    makespan: float
    leased_gpu_s: float
    useful_gpu_s: float
    backlog_gpu_s: float  # GPU-seconds leased while jobs were queued
    backlog_s: float  # seconds during which jobs were queued
    idle_held_gpu_s: float  # free GPUs held for a waiting job (backfill limit or preemption under way)
    idle_other_gpu_s: float  # free GPUs, jobs queued, none of them started there (too few free, or "one")
    held_elsewhere_gpu_s: float  # of the held: on nodes other than the one the job then started on
    max_nodes_holding_one: int
    preemptions: int
    preemptions_in_vain: int  # victims whose job then started on another node
    preempted_with_room_elsewhere: int  # victims preempted while another node had the GPUs free
    blocked_by_slots: int  # (job, node) preemptions that would have been made, but no worker slot was idle
    ahead_of_higher: int  # backfills that started ahead of a waiting job of higher priority
    backfills: int
    max_bypassed: int
    decisions: int
    choose_times: dict[int, list[float]]  # decimal order of the queue's length -> s per choose call
    wall_s: float
    holds: int = 0  # jobs whose held_on a node took before their first start (no node is lost: once a job)
    holds_when_full: int = 0  # of them, taken by a node with no GPU free at that decision
    started_on_holder: int = 0  # of them, first started on the node that held for them (the others elsewhere)

    def utilisation(self) -> float:
        return self.leased_gpu_s / (self.nodes * NODE_GPUS * self.makespan)

    def under_backlog(self) -> float:
        """Utilisation while jobs waited: the most the policy gets out of the GPUs when work is there."""
        return self.backlog_gpu_s / (self.nodes * NODE_GPUS * self.backlog_s) if self.backlog_s else float("nan")

    def useful(self) -> float:
        return self.useful_gpu_s / (self.nodes * NODE_GPUS * self.makespan)

    def waits(self, size: str | None = None, priority: int | None = None) -> list[float]:
        return [j.first_start - j.spec.arrival for j in self.jobs
                if (size is None or j.spec.size == size) and (priority is None or j.spec.priority >= priority)]


ARRIVE, END, PAUSED, RECHECK = "arrive", "end", "paused", "recheck"


class Simulator:
    """N nodes of 8 GPUs, the queue as ``jobs.scheduler.queue_snapshot`` orders it, and the workers'
    decisions as ``jobs.scheduler._start_next`` makes them (see ``decide``)."""

    def __init__(self, trace: list[TraceJob], nodes: int, policy: Policy, time_choose: bool = False) -> None:
        self.policy = policy
        self.nodes = [Node(i) for i in range(nodes)]
        self.jobs = {t.id: SimJob(t, t.work) for t in trace}
        self.queue: list[Waiting] = []  # queue order
        self.keys: list[tuple] = []  # the sort key of each queue entry
        self.events: list[tuple] = []
        self.seq = 0
        self.now = 0.0
        self.next_node = 0
        self.time_choose = time_choose
        self.choose_times: dict[int, list[float]] = defaultdict(list)
        self.leased_gpu_s = self.idle_held = self.idle_other = self.held_elsewhere = 0.0
        self.backlog_gpu_s = self.backlog_s = 0.0
        self.held: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.victims_of: dict[str, list[int]] = defaultdict(list)  # target -> nodes of its victims
        self.preemptions = self.in_vain = self.backfills = self.decisions = self.max_holding = 0
        self.free_elsewhere = self.ahead_of_higher = self.holds = self.holds_when_full = self.on_holder = 0
        self.slot_blocked: set[tuple[str, int]] = set()
        for t in trace:
            self._push(t.arrival, ARRIVE, t.id)

    # -------------------------------------------------------------------------------------- the queue
    def _enqueue(self, job: SimJob) -> None:
        job.status = "queued"
        i = bisect.bisect_left(self.keys, job.key)
        self.keys.insert(i, job.key)
        self.queue.insert(i, job.waiting())

    def _dequeue(self, job: SimJob) -> None:
        i = bisect.bisect_left(self.keys, job.key)
        del self.keys[i], self.queue[i]

    def _bump(self, job_id: str) -> None:
        """``UPDATE jobs SET bypassed = bypassed + 1`` of a job a backfill started ahead of."""
        job = self.jobs[job_id]
        job.bypassed += 1
        self.queue[bisect.bisect_left(self.keys, job.key)] = job.waiting()

    def _hold(self, job: SimJob, node: Node) -> None:
        """``UPDATE jobs SET held_on = <node>`` of the job ``choose`` held the GPUs for (not a preemption's
        target), where it was held on no node, this one, or one not seen within ``heartbeat_timeout_s`` (no
        node is ever lost here: every node is live)."""
        if job.held_on == node.name:
            return
        # choose() holds for a job at the limit held on another live node on no node but that one; the real
        # conditional update would find no row (another node won) and choose again: never the case here
        assert job.held_on is None, (job.spec.id, job.held_on, node.name)
        job.held_on = node.name
        if job.first_start is None:  # counted for the wait to the first start (not after a preemption)
            self.holds += 1
            self.holds_when_full += not node.free
        self.queue[bisect.bisect_left(self.keys, job.key)] = job.waiting()

    def _push(self, at: float, kind: str, job_id: str | None = None, token: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, job_id, token))

    # ------------------------------------------------------------------------------------ the run
    def run(self) -> Result:
        started = time.perf_counter()
        while self.events:
            at, _, kind, job_id, token = heapq.heappop(self.events)
            self._account(at - self.now)
            self.now = at
            job = self.jobs.get(job_id) if job_id else None
            if kind == ARRIVE:
                self._enqueue(job)
                first = self.next_node = (self.next_node + 1) % len(self.nodes)
            elif kind == RECHECK:
                first = job.node if job.node is not None else 0
            elif token != job.token:
                continue  # the end of a run that was preempted meanwhile
            else:
                first = job.node
                self._release(job)
                if kind == END:
                    job.status, job.end, job.preempted_by = "done", at, None
                else:  # PAUSED: checkpointed; back in the queue at its place, to resume from the checkpoint
                    job.preempted_by, job.node = None, None
                    job.preemptions += 1
                    job.remaining += RESTART_S[job.spec.size]
                    self._enqueue(job)
            self._schedule(first)
        done = list(self.jobs.values())
        assert all(j.status == "done" for j in done), "a job never ran"
        t0 = min(j.spec.arrival for j in done)
        return Result(
            self.policy, len(self.nodes), done, max(j.end for j in done) - t0, self.leased_gpu_s,
            sum(j.spec.gpus * j.spec.work for j in done), self.backlog_gpu_s, self.backlog_s, self.idle_held,
            self.idle_other, self.held_elsewhere, self.max_holding, self.preemptions, self.in_vain,
            self.free_elsewhere, len(self.slot_blocked), self.ahead_of_higher, self.backfills,
            max(j.bypassed for j in done), self.decisions, dict(self.choose_times), time.perf_counter() - started,
            self.holds, self.holds_when_full, self.on_holder)

    def _account(self, dt: float) -> None:
        if dt <= 0:
            return
        holding = Counter()
        if self.queue:
            self.backlog_s += dt
            self.backlog_gpu_s += sum(node.leased for node in self.nodes) * dt
        for node in self.nodes:
            self.leased_gpu_s += node.leased * dt
            if not self.queue or not node.free:
                continue
            if node.holding is not None:
                self.idle_held += node.free * dt
                self.held[node.holding][node.index] += node.free * dt
                holding[node.holding] += 1
            else:
                self.idle_other += node.free * dt
        if holding:
            self.max_holding = max(self.max_holding, max(holding.values()))

    def _schedule(self, first: int) -> None:
        """The nodes' workers look at the queue in turn, one decision each (the node of the event first),
        round after round while one of them starts or preempts something: a real worker makes one decision
        per wake-up, the wake-ups of a change go to whichever node's idle worker takes them first, and each
        queued job's poller and each node's watch cover the rest within 15 s."""
        order = self.nodes[first:] + self.nodes[:first]
        changed = True
        while changed:
            changed = False
            for node in order:
                if self.decide(node):
                    changed = True

    # ------------------------------------------------------------------------------------ a decision
    def decide(self, node: Node) -> bool:
        """One ``start_next`` on ``node``: True when it started a job or preempted some."""
        policy = self.policy
        if not self.queue:
            node.holding = None
            return False
        if len(node.jobs) >= node.size:  # every worker slot of the node (one per GPU) runs a job's task: no
            if policy.preempt:  # start_next runs there until one ends, so nothing on it is preempted either
                self._preempt_for(node, frozenset(), dry_run=True)
            return False
        self.decisions += 1
        if policy.kind == "one":
            if node.jobs:
                node.holding = None
                return False
            choice = self._choose(node, node.size, 0, frozenset())
        else:
            reserved = frozenset(j.preempted_by for j in node.jobs.values()
                                 if j.status == "pausing" and j.preempted_by)  # preemptions_under_way(node)
            # Called with no GPU free too, as _start_next calls it: it starts nothing then (every job needs a
            # GPU at least), but its held_for makes this node the one that holds for a job at the limit.
            choice = self._choose(node, node.free, policy.backfill_limit, reserved)
            if choice.held_for is not None and choice.held_for not in reserved:
                self._hold(self.jobs[choice.held_for], node)
            if choice.job_id is None and policy.preempt:
                node.holding = choice.held_for
                return self._preempt_for(node, reserved)
        node.holding = choice.held_for
        if choice.job_id is None:
            return False
        self._start(self.jobs[choice.job_id], node, choice.skipped)
        return True

    def _choose(self, node: Node, free: int, limit: int, reserved: frozenset[str]) -> Choice:
        if not self.time_choose:
            return choose(self.queue, free, node.size, limit, DEVICE_BYTES, reserved, node.name)
        t0 = time.perf_counter()
        choice = choose(self.queue, free, node.size, limit, DEVICE_BYTES, reserved, node.name)
        self.choose_times[int(math.log10(len(self.queue)))].append(time.perf_counter() - t0)
        return choice

    def _start(self, job: SimJob, node: Node, skipped: list[str]) -> None:
        self._dequeue(job)
        job.status, job.node, job.run_start = "running", node.index, self.now
        if job.first_start is None:
            job.first_start = self.now
            self.on_holder += job.held_on == node.name
        job.token += 1
        node.jobs[job.spec.id] = job
        node.free -= job.spec.gpus
        self._push(self.now + job.remaining, END, job.spec.id, job.token)
        if skipped:
            self.backfills += 1
            if any(self.jobs[j].spec.priority > job.spec.priority for j in skipped):
                self.ahead_of_higher += 1  # a backfill ahead of a job of higher priority (preemption is not tried)
            for job_id in skipped:
                self._bump(job_id)
        if self.policy.preempt:  # when it becomes preemptible, the waiting jobs may preempt it
            self._push(self.now + self.policy.min_run_s, RECHECK, job.spec.id)
        held = self.held.pop(job.spec.id, None)
        if held:
            self.held_elsewhere += sum(v for n, v in held.items() if n != node.index)
        victims = self.victims_of.pop(job.spec.id, None)
        if victims:
            self.in_vain += sum(1 for n in victims if n != node.index)

    def _release(self, job: SimJob) -> None:
        node = self.nodes[job.node]
        del node.jobs[job.spec.id]
        node.free += job.spec.gpus

    def _preempt_for(self, node: Node, reserved: frozenset[str], dry_run: bool = False) -> bool:
        """``jobs.scheduler._preempt_for``: the first job of the queue this node can run pauses the running
        jobs of lower priority it needs the GPUs of, unless a preemption is under way for it (anywhere)."""
        target = next((w for w in self.queue if fits_node(w, node.size, DEVICE_BYTES)), None)
        if target is None or target.id in reserved:
            return False
        if any(j.preempted_by == target.id for n in self.nodes for j in n.jobs.values() if j.status == "pausing"):
            return False
        now = EPOCH + timedelta(seconds=self.now)
        running = [Running(j.spec.id, j.spec.priority, j.spec.gpus, EPOCH + timedelta(seconds=j.run_start))
                   for j in node.jobs.values() if j.status == "running"]
        freeing = sum(j.spec.gpus for j in node.jobs.values() if j.status == "pausing")
        victims = preemption_victims(target, node.free + freeing, running, now, self.policy.min_run_s)
        if dry_run:
            if victims:
                self.slot_blocked.add((target.id, node.index))
            return False
        if victims and any(n is not node and n.free >= target.need for n in self.nodes):
            self.free_elsewhere += len(victims)  # another node could start the target now: not looked at
        for victim_id in victims:
            victim = self.jobs[victim_id]
            victim.status, victim.preempted_by = "pausing", target.id
            victim.remaining -= self.now - victim.run_start  # its checkpoint is taken after the current step
            self.preemptions += 1
            self.victims_of[target.id].append(node.index)
            if victim.remaining > PAUSE_S[victim.spec.size]:  # else it ends on its own before it has paused
                victim.token += 1
                self._push(self.now + PAUSE_S[victim.spec.size], PAUSED, victim_id, victim.token)
        return bool(victims)


# ----------------------------------------------------------------------------------------- decision time
def time_choose(shapes: dict[str, Shape], sizes: list[int], seed: int = 1) -> list[dict]:
    """``choose`` alone on queues of the trace's mix: a start (the head fits the free GPUs), a walk to a
    backfill (3 GPUs free, the first job that fits them is found deeper), and no start at all (1 GPU free,
    no 1-GPU job: the whole queue walked, as a poller of a busy node does)."""
    rng = random.Random(seed)
    rows = []
    for n in sizes:
        queue = []
        for i in range(n):
            size = _weighted(rng, tuple(MIX.items()))
            queue.append(Waiting(f"q{i}", shapes[size].gpus, 0, shapes[size].peak_bytes, 0))
        big_first = sorted(queue, key=lambda w: -w.need)
        no_small = [w for w in queue if w.need > 1]
        cases = {"head starts (8 free)": (queue, 8), "backfill walk (3 free)": (big_first, 3),
                 "no start, whole queue walked": (no_small, 1)}
        for case, (q, free) in cases.items():
            reps = max(20, min(2000, 200_000 // max(len(q), 1)))
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                choose(q, free, NODE_GPUS, DEFAULTS.backfill_limit, DEVICE_BYTES)
                times.append(time.perf_counter() - t0)
            rows.append({"queue": n, "case": case, "walked": len(q), "median": statistics.median(times),
                         "p99": percentile(times, 99)})
    return rows


def time_start_next(shapes: dict[str, Shape], sizes: list[int], reps: dict[int, int], seed: int = 2) -> dict:
    """``jobs.scheduler.start_next`` on Postgres with ``sizes`` queued jobs (rows inserted in bulk through the
    ORM): a start on an empty node (undone after each call, untimed, so the queue stays the same) and a
    decision that starts nothing (the node's 8 GPUs held by a running job: the whole queue is walked), with
    quotas off and on (``quota_running_jobs`` 2, 10 of the 50 users at it)."""
    from sqlalchemy import create_engine, delete, insert, text, update

    from jobs import scheduler
    from jobs.db import close_database, database
    from jobs.migrate import upgrade
    from jobs.models import File, GpuLease, Job, JobEvent, User

    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{BENCH_DB}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)'))
        c.execute(text(f'CREATE DATABASE "{BENCH_DB}"'))
    rng = random.Random(seed)
    users = [f"user{u:02d}" for u in range(50)]
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    out: dict = {"rows": [], "snapshot": {}}
    try:
        upgrade(url)
        db = database(url)
        with db.session() as s:
            out["postgres"] = s.execute(text("SHOW server_version")).scalar()
            s.add_all([User(id=u, name=u) for u in users])
            s.flush()
            s.add(File(id="file-0", owner_id=users[0], filename="d.jsonl", purpose="fine-tune", bytes=1,
                       storage_path="x"))

        def job_row(job_id: str, owner: str, size: str, status: str, n: int) -> dict:
            shape = shapes[size]
            return {"id": job_id, "owner_id": owner, "status": status, "model": f"llama-{size.lower()}",
                    "training_file_id": "file-0", "method": "lomo", "hyperparameters": {}, "metadata_": {},
                    "result_files": [], "gpus": shape.gpus, "priority": _weighted(rng, PRIORITIES),
                    "created_at": start + timedelta(seconds=n), "attempt": 0,
                    "predicted_memory": {"available": True, "fits": True, "device": "cuda", "gpus": shape.gpus,
                                         "per_device": {"peak_bytes": shape.peak_bytes}}}

        # running jobs elsewhere, for the quota: users 0-9 have 2 each on another node; one job fills bench-0
        with db.session() as s:
            rows = [job_row(f"run-{u}-{k}", users[u], "7B", "running", -100 + 2 * u + k)
                    for u in range(10) for k in range(2)]
            rows.append(job_row("filler", users[49], "65B", "running", -1))
            s.execute(insert(Job), rows)
            s.execute(insert(GpuLease), [{"node": "bench-other", "device_index": i, "job_id": r["id"], "attempt": 1,
                                          "leased_at": start} for i, r in enumerate(rows[:-1])])
        quota = Settings(database_url=url, quota_running_jobs=2)
        queued = 0
        for size_q in sizes:
            with db.session() as s:
                s.execute(insert(Job), [job_row(f"q{n:06d}", rng.choice(users), _weighted(rng, tuple(MIX.items())),
                                                "queued", n) for n in range(queued, size_q)])
                s.execute(text("ANALYZE"))
            queued = size_q
            times = []
            for _ in range(reps[size_q]):
                with db.session() as s:
                    t0 = time.perf_counter()
                    scheduler.queue_snapshot(s)
                    times.append(time.perf_counter() - t0)
            out["snapshot"][size_q] = (statistics.median(times), percentile(times, 99))
            for quotas_on in (False, True):
                settings = quota if quotas_on else None
                for case in ("start (8 GPUs free)", "no start (node full)"):
                    full = case.startswith("no start")
                    if full:
                        with db.session() as s:
                            s.add_all([GpuLease(node="bench-0", device_index=i, job_id="filler", attempt=1,
                                                leased_at=start) for i in range(NODE_GPUS)])
                    times = []
                    for _ in range(reps[size_q]):
                        t0 = time.perf_counter()
                        started = scheduler.start_next(db, "bench-0", NODE_GPUS, "bench-0:1",
                                                       DEFAULTS.backfill_limit, device_bytes=DEVICE_BYTES,
                                                       quota_settings=settings)
                        times.append(time.perf_counter() - t0)
                        if started is not None:  # undone, so that every call sees the same queue
                            assert not full
                            with db.session() as s:
                                s.execute(delete(GpuLease).where(GpuLease.job_id == started.job_id))
                                s.execute(delete(JobEvent).where(JobEvent.job_id == started.job_id))
                                s.execute(update(Job).where(Job.id == started.job_id).values(
                                    status="queued", started_at=None, claimed_by=None, heartbeat_at=None,
                                    attempt=0))
                        else:
                            assert full, "start_next started nothing on an empty node"
                    if full:
                        with db.session() as s:
                            s.execute(delete(GpuLease).where(GpuLease.node == "bench-0"))
                    out["rows"].append({"queue": size_q, "quotas": quotas_on, "case": case, "calls": len(times),
                                        "median": statistics.median(times), "p99": percentile(times, 99)})
    finally:
        close_database(url)
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)'))
        admin.dispose()
    return out


# -------------------------------------------------------------------------------------------- the report
def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def hours(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    h = seconds / HOUR
    return f"{h:.1f} h" if h >= 1 else f"{seconds / 60:.0f} min"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}" if seconds < 0.01 else f"{seconds * 1000:.1f}"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1000:.2f} ms"


def merged(results: list[Result]) -> Result:
    """Several seeds of one policy as one result: waits pooled, GPU-seconds and makespans summed."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    times: dict[int, list[float]] = defaultdict(list)
    for r in results:
        for k, v in r.choose_times.items():
            times[k] += v
    return Result(first.policy, first.nodes, [j for r in results for j in r.jobs], sum(r.makespan for r in results),
                  sum(r.leased_gpu_s for r in results), sum(r.useful_gpu_s for r in results),
                  sum(r.backlog_gpu_s for r in results), sum(r.backlog_s for r in results),
                  sum(r.idle_held_gpu_s for r in results), sum(r.idle_other_gpu_s for r in results),
                  sum(r.held_elsewhere_gpu_s for r in results), max(r.max_nodes_holding_one for r in results),
                  sum(r.preemptions for r in results), sum(r.preemptions_in_vain for r in results),
                  sum(r.preempted_with_room_elsewhere for r in results), sum(r.blocked_by_slots for r in results),
                  sum(r.ahead_of_higher for r in results),
                  sum(r.backfills for r in results), max(r.max_bypassed for r in results),
                  sum(r.decisions for r in results), dict(times), sum(r.wall_s for r in results),
                  sum(r.holds for r in results), sum(r.holds_when_full for r in results),
                  sum(r.started_on_holder for r in results))


def policy_table(results: list[Result], runs: int) -> list[str]:
    head = ("| policy | GPU utilisation | useful | while jobs wait | makespan | "
            + " | ".join(f"{s} p50 / p95 wait" for s in SIZES)
            + " | all p95 | max wait | preemptions | backfills | idle while queued: held / other (GPU-h) |")
    lines = [head, "| --- |" + " ---: |" * (9 + len(SIZES))]
    for r in results:
        cells = [f"{hours(percentile(r.waits(s), 50))} / {hours(percentile(r.waits(s), 95))}" for s in SIZES]
        lines.append(f"| {r.policy.name} | {r.utilisation():.1%} | {r.useful():.1%} | {r.under_backlog():.1%} | "
                     f"{r.makespan / DAY / runs:.2f} d | " + " | ".join(cells)
                     + f" | {hours(percentile(r.waits(), 95))} | {hours(max(r.waits()))} | {r.preemptions} | "
                       f"{r.backfills} | {r.idle_held_gpu_s / HOUR:.0f} / {r.idle_other_gpu_s / HOUR:.0f} |")
    return lines


def priority_table(results: list[Result]) -> list[str]:
    lines = ["| policy | priority 0: p50 / p95 wait | priority >= 1: p50 / p95 wait | preemptions (jobs) | "
             "victims whose job then started on another node | preemptions while another node had the GPUs "
             "free | preemptions never made: no idle worker slot on the node |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        low = [j.first_start - j.spec.arrival for j in r.jobs if j.spec.priority == 0]
        high = r.waits(priority=1)
        preempted = sum(1 for j in r.jobs if j.preemptions)
        lines.append(f"| {r.policy.name} | {hours(percentile(low, 50))} / {hours(percentile(low, 95))} | "
                     f"{hours(percentile(high, 50))} / {hours(percentile(high, 95))} | {r.preemptions} "
                     f"({preempted}) | {r.preemptions_in_vain} | {r.preempted_with_room_elsewhere} | "
                     f"{r.blocked_by_slots} |")
    return lines


def load_table(rows: list[tuple[float, Result]], runs: int) -> list[str]:
    lines = ["| offered load | policy | GPU utilisation | while jobs wait | makespan | all p50 / p95 wait | 7B p95 | "
             "65B p95 | held idle for a job (GPU-h per run) |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for load, r in rows:
        lines.append(f"| {load:.0%} | {r.policy.name} | {r.utilisation():.1%} | {r.under_backlog():.1%} | "
                     f"{r.makespan / DAY / runs:.2f} d | "
                     f"{hours(percentile(r.waits(), 50))} / {hours(percentile(r.waits(), 95))} | "
                     f"{hours(percentile(r.waits('7B'), 95))} | {hours(percentile(r.waits('65B'), 95))} | "
                     f"{r.idle_held_gpu_s / HOUR / runs:.0f} |")
    return lines


def trace_summary(traces: list[list[TraceJob]], gpus: int, span: float) -> str:
    jobs = [j for t in traces for j in t]
    count = Counter(j.size for j in jobs)
    gpu_h = defaultdict(float)
    for j in jobs:
        gpu_h[j.size] += j.gpus * j.work / HOUR
    total = sum(gpu_h.values())
    parts = ", ".join(f"{s} {count[s]} ({gpu_h[s] / total:.0%} of the GPU-hours)" for s in SIZES)
    works = [j.work for j in jobs]
    return (f"{len(jobs):,} jobs ({len(jobs) / len(traces):,.0f} per run): {parts}; run time median "
            f"{hours(statistics.median(works))}, p95 {hours(percentile(works, 95))}, longest {hours(max(works))}; "
            f"offered load {total * HOUR / (gpus * span * len(traces)):.0%} of {gpus} GPUs over the arrivals "
            f"({span / DAY:.1f} days per run)")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {os.cpu_count()} CPUs ({usable} usable); Python {platform.python_version()}, {platform.platform()}"


def git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "jobs/scheduler.py", "jobs/leases.py", "jobs/lifecycle.py",
                "jobs/quotas.py", "jobs/settings.py", "jobs/db.py", "lomo_core/memory_model.py")
    return rev + (" (with uncommitted changes to " + ", ".join(line.split()[-1] for line in dirty.splitlines())
                  + ")" if dirty else "")


def sweep_table(rows: list[tuple[int, Result]]) -> list[str]:
    lines = ["| backfill_limit | GPU utilisation | 7B p95 wait | 65B p50 / p95 wait | 65B max wait | backfills | "
             "idle held for a job (GPU-h) |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for limit, r in rows:
        big = r.waits("65B")
        lines.append(f"| {'none' if limit >= UNBOUNDED else limit} | {r.utilisation():.1%} | "
                     f"{hours(percentile(r.waits('7B'), 95))} | {hours(percentile(big, 50))} / "
                     f"{hours(percentile(big, 95))} | {hours(max(big))} | {r.backfills} | "
                     f"{r.idle_held_gpu_s / HOUR:.0f} |")
    return lines


def since_previous(one: list[Result], many: list[Result], load8: list[tuple[float, Result]]) -> list[str]:
    """The figures against ``PREVIOUS`` (the rule before commit adc7e3f), policy by policy."""
    a = {r.policy.name: r for r in one}
    b = {r.policy.name: r for r in many}
    low = {r.policy.name: r for x, r in load8 if abs(x - 0.7) < 1e-9}

    def h(value: float | None) -> str:
        return "-" if value is None else hours(value * HOUR)

    lines = ["| policy | 1 node: utilisation | 1 node: all p95 wait | 8 nodes: utilisation | 8 nodes: all p95 wait | "
             "8 nodes: held idle for a job (GPU-h) | 8 nodes at 70%: all p95 / 7B p95 / 65B p95 wait |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, (u1, w1, u8, w8, held8, l95, l7, l65) in PREVIOUS.items():
        r1, r8, r7 = a[name], b[name], low.get(name)
        now7 = (f"{hours(percentile(r7.waits(), 95))} / {hours(percentile(r7.waits('7B'), 95))} / "
                f"{hours(percentile(r7.waits('65B'), 95))}" if r7 else "-")
        lines.append(f"| {name} | {u1:.1%} / {r1.utilisation():.1%} | {h(w1)} / {hours(percentile(r1.waits(), 95))} | "
                     f"{u8:.1%} / {r8.utilisation():.1%} | {h(w8)} / {hours(percentile(r8.waits(), 95))} | "
                     f"{held8:,} / {r8.idle_held_gpu_s / HOUR:,.0f} | {h(l95)} / {h(l7)} / {h(l65)} before, "
                     f"{now7} now |")
    worse = []
    for name, (u1, w1, u8, w8, _, l95, l7, l65) in PREVIOUS.items():
        r1, r8, r7 = a[name], b[name], low.get(name)
        pairs = [("1 node utilisation", u1, r1.utilisation(), False),
                 ("1 node p95", w1, percentile(r1.waits(), 95) / HOUR, True),
                 ("8 nodes utilisation", u8, r8.utilisation(), False),
                 ("8 nodes p95", w8, percentile(r8.waits(), 95) / HOUR, True)]
        if r7 is not None:
            pairs += [("8 nodes at 70%: all p95", l95, percentile(r7.waits(), 95) / HOUR, True),
                      ("7B p95", l7, percentile(r7.waits("7B"), 95) / HOUR, True),
                      ("65B p95", l65, percentile(r7.waits("65B"), 95) / HOUR, True)]
        for what, before, now, lower_better in pairs:
            if before is None:
                continue
            tolerance = 0.05 * before if lower_better else 0.002
            if (now - before > tolerance) if lower_better else (before - now > tolerance):
                fmt = hours(now * HOUR) if lower_better else f"{now:.1%}"
                was = hours(before * HOUR) if lower_better else f"{before:.1%}"
                if fmt != was:  # not the same figure once rounded as the report rounds it
                    worse.append(f"{name}, {what}: {was} before, {fmt} now")
    lines += ["", "Worse than before by more than 5% (waits) or 0.2 points (utilisation): "
              + ("; ".join(worse) if worse else "nothing") + "."]
    return lines


def reading(one: list[Result], many: list[Result], load8: list[tuple[float, Result]], db: dict | None,
            interval: float, load: float, runs: int, compare: bool = False) -> list[str]:
    """What the figures say, from the figures."""
    def p95(r: Result, size: str | None = None) -> str:
        return hours(percentile(r.waits(size), 95))

    def p0(r: Result, q: float) -> str:
        return hours(percentile([j.first_start - j.spec.arrival for j in r.jobs if j.spec.priority == 0], q))

    a = {r.policy.name: r for r in one}
    b = {r.policy.name: r for r in many}
    lomo, pre, unb, fifo, single = (a[p.name] for p in POLICIES)
    lomo8, pre8, unb8, fifo8, single8 = (b[p.name] for p in POLICIES)
    lower = min((x for x, _ in load8), default=load)
    low = {r.policy.name: r for x, r in load8 if x == lower}
    out = [
        f"- **What wins.** Of the bounded policies the real rule: on 1 node the defaults hold the GPUs "
        f"{lomo.utilisation():.1%} of the makespan against {fifo.utilisation():.1%} under strict FIFO and "
        f"{single.utilisation():.1%} one job at a time, p95 wait {p95(lomo)} against {p95(fifo)} and "
        f"{p95(single)}; on 8 nodes {lomo8.utilisation():.1%} against {fifo8.utilisation():.1%} with "
        f"`backfill_limit` 0 and {single8.utilisation():.1%}, p95 {p95(lomo8)} against {p95(fifo8)} and "
        f"{p95(single8)}"
        + (" (on several nodes the defaults and limit 0 are now level: with one holding node per job, limit 0 "
           "no longer makes the whole cluster wait for the head of the queue, see finding 1)"
           if abs(lomo8.utilisation() - fifo8.utilisation()) < 0.01
           and abs(percentile(lomo8.waits(), 95) / percentile(fifo8.waits(), 95) - 1) < 0.15 else "")
        + f". One job per node (LLaMA-Factory's board) leaves idle every GPU its job does not use: a week of "
        f"arrivals takes {single.makespan / DAY / runs:.1f} days on one node and jobs wait days to weeks. "
        f"Unbounded backfill has the best utilisation and the shortest waits of the small jobs (8 nodes: 7B p95 "
        f"{p95(unb8, '7B')} against {p95(lomo8, '7B')} with the limit), paid by the large ones (below).",
        f"- **Saturation.** At {load:.0%} offered load no policy keeps up with the arrivals: while jobs waited the "
        f"defaults used {lomo.under_backlog():.1%} of the GPUs on 1 node and {lomo8.under_backlog():.1%} on 8 "
        f"(unbounded backfill {unb.under_backlog():.1%} / {unb8.under_backlog():.1%}, FIFO "
        f"{fifo.under_backlog():.1%} / {fifo8.under_backlog():.1%}), so the queue grows over the trace and "
        f"the waits at {load:.0%} depend on its length. The load tables show the stable regime: on 8 nodes at "
        f"{lower:.0%} the defaults' p95 wait is {p95(low['lomo (defaults)'])} (FIFO {p95(low['strict FIFO'])}, "
        f"unbounded {p95(low['backfill unbounded'])}). On one node the 65B jobs (8 GPUs, {shares(one)} of "
        f"the GPU-hours) are the cause: while one runs or the node drains for one, nothing else runs.",
        f"- **Finding 1: a job at the backfill limit is held for on one node now, but on the first to decide, "
        f"not the first to have its GPUs.** `bypassed` is one column per job, bumped by a backfill on any node, "
        f"so a waiting 8-GPU job reaches the limit {DEFAULTS.backfill_limit} after {DEFAULTS.backfill_limit} "
        f"starts anywhere in the cluster. "
        + (f"Before commit adc7e3f `choose` then held the free GPUs for it on every node where it `fits_node`: "
           f"in the previous report (commit {PREVIOUS_REV}) up to {PREVIOUS_HELD[2]} nodes held for one job at "
           f"once, {PREVIOUS_HELD[0]:,} of the {PREVIOUS_HELD[1]:,} GPU-hours held idle on 8 nodes were on "
           f"nodes other than the one the job then started on ({PREVIOUS_HELD[3]:.1%} of the GPU-hours used), "
           f"and the 8-node defaults were close to FIFO (utilisation {PREVIOUS['lomo (defaults)'][2]:.1%} "
           f"against {PREVIOUS['strict FIFO'][2]:.1%}, p95 wait {hours(PREVIOUS['lomo (defaults)'][3] * HOUR)} "
           f"against {hours(PREVIOUS['strict FIFO'][3] * HOUR)}). Now " if compare else "Since commit adc7e3f ")
        + f"the first node whose `choose` holds for it becomes its `held_on`, and the other nodes backfill "
        f"past it without bumping its count: at most {lomo8.max_nodes_holding_one} node(s) held for one job "
        f"at once, {lomo8.idle_held_gpu_s / HOUR:,.0f} GPU-hours were held idle "
        f"({lomo8.idle_held_gpu_s / lomo8.leased_gpu_s:.1%} of the GPU-hours used), utilisation "
        f"{lomo8.utilisation():.1%}, p95 wait {p95(lomo8)} (unbounded backfill: {unb8.utilisation():.1%}, "
        f"{p95(unb8)}). But {lomo8.held_elsewhere_gpu_s / HOUR:,.0f} of those "
        f"{lomo8.idle_held_gpu_s / HOUR:,.0f} GPU-hours "
        f"({lomo8.held_elsewhere_gpu_s / max(lomo8.idle_held_gpu_s, 1e-9):.0%}) are still on a node other than "
        f"the one the job then started on: of the {lomo8.holds:,} jobs held for, {lomo8.holds_when_full:,} "
        f"were taken by a node with no GPU free at that decision (a node whose GPUs are all leased but whose "
        f"worker has an idle slot decides like any other, and `choose` holds for a job at the limit whatever "
        f"the free count), and only {lomo8.started_on_holder:,} started on the node that held for them; the "
        f"others started on a node whose running jobs happened to end first (a job that fits the free GPUs "
        f"starts before its `held_on` is looked at). The holder is whichever node decides first, not the one "
        f"that will have the GPUs soonest (the rule has no run-time estimate), and its held GPUs idle in vain "
        f"when another node ends up running the job: that is what is left of this weakness. The same rule "
        f"changes `backfill_limit` 0: each node holds for the first job that no other node holds for, so on "
        f"several nodes \"strict FIFO\" is FIFO per node"
        + (f" (8 nodes: p95 wait {hours(PREVIOUS['strict FIFO'][3] * HOUR)} before, {p95(fifo8)} now; 1 node "
           f"unchanged, {p95(fifo)})" if compare else "") + "."
        + (f" One figure is worse than before: at {lower:.0%} load on 8 nodes the 65B p95 wait of the defaults "
           f"is {p95(low['lomo (defaults)'], '65B')} against {hours(PREVIOUS['lomo (defaults)'][7] * HOUR)}. A "
           f"65B job at the limit now waits for its one holder (mostly a node that was full when it took the "
           f"hold) or for a node that happens to empty while it backfills, where before every node drained for "
           f"it and the first to drain ran it. That drain cost the small jobs more (7B p95 at {lower:.0%} "
           f"{hours(PREVIOUS['lomo (defaults)'][6] * HOUR)} before, {p95(low['lomo (defaults)'], '7B')} now), "
           f"and at {load:.0%} it cost the 65B jobs themselves more than it saved them (65B p95 "
           f"{hours(PREVIOUS_65B[1] * HOUR)} before, {p95(lomo8, '65B')} now)."
           if compare and percentile(low["lomo (defaults)"].waits("65B"), 95) / HOUR
           > 1.05 * PREVIOUS["lomo (defaults)"][7] else ""),
        f"- **The backfill limit bounds starvation, at a price.** On 1 node, without it the 65B jobs wait "
        f"longest: p95 {p95(unb, '65B')}, longest {hours(max(unb.waits('65B')))}, against {p95(lomo, '65B')} / "
        f"{hours(max(lomo.waits('65B')))} with the limit {DEFAULTS.backfill_limit}. On 8 nodes it takes their "
        f"p95 from {p95(unb8, '65B')} (unbounded) to {p95(lomo8, '65B')} at {load:.0%} load"
        + (" (before commit adc7e3f the limit helped them not at all there: "
           f"{hours(PREVIOUS_65B[0] * HOUR)} unbounded, {hours(PREVIOUS_65B[1] * HOUR)} with it, the whole "
           "cluster draining for each)" if compare else "")
        + f", and from {p95(low['backfill unbounded'], '65B')} to {p95(low['lomo (defaults)'], '65B')} at "
        f"{lower:.0%}, for a 7B p95 of {p95(low['lomo (defaults)'], '7B')} instead of "
        f"{p95(low['backfill unbounded'], '7B')}. A waiting job's "
        f"wait is bounded by the runs of the at most {DEFAULTS.backfill_limit} jobs started ahead of it and of "
        f"those running when it reached the limit. But the limit counts starts, not their length: with "
        f"heavy-tailed runs one backfilled job may be the longest of the drain, and the held GPUs idle for the "
        f"whole drain (1 node: {lomo.idle_held_gpu_s / HOUR / runs:.0f} GPU-h per week, "
        f"{lomo.idle_held_gpu_s / lomo.leased_gpu_s:.1%} of the GPU-hours used), with no look at when the "
        f"running jobs will end (the rule has no run-time estimate: a job that would end before the drain "
        f"could use them). On 1 node the limit {DEFAULTS.backfill_limit} gives {lomo.utilisation():.1%} against "
        f"FIFO's {fifo.utilisation():.1%} and a 7B p95 of {p95(lomo, '7B')} against {p95(fifo, '7B')}; the sweep "
        f"shows larger limits trading the small jobs' waits for the large ones'.",
        f"- **Preemption** gives the jobs of priority >= 1 their GPUs (p95 wait, 1 node: "
        f"{hours(percentile(pre.waits(priority=1), 95))} against {hours(percentile(lomo.waits(priority=1), 95))}"
        f" without; 8 nodes {hours(percentile(pre8.waits(priority=1), 95))} against "
        f"{hours(percentile(lomo8.waits(priority=1), 95))}). The priority-0 jobs pay: their p50 wait on 8 nodes "
        f"is {p0(pre8, 50)} against {p0(lomo8, 50)}, 1 node {p0(pre, 50)} against {p0(lomo, 50)}. The "
        f"checkpoints and restarts ({(pre8.leased_gpu_s - pre8.useful_gpu_s) / HOUR:,.0f} GPU-h on 8 nodes, "
        f"assumed costs) are {(pre8.leased_gpu_s - pre8.useful_gpu_s) / HOUR / (pre8.nodes * NODE_GPUS):.0f} "
        f"hours of the whole cluster, added to the backlog of a cluster that does not keep up, and each "
        f"preempted job goes back ahead of the priority-0 jobs that came after it.",
        f"- **Weakness 2: a preemption looks at its own node only.** `_preempt_for` preempts on the node that "
        f"decides without asking whether the waiting job fits the free GPUs of another node: in the 8-node run "
        f"{pre8.preempted_with_room_elsewhere} of the {pre8.preemptions} victims were paused while another node "
        f"had enough GPUs free for the job, and {pre8.preemptions_in_vain} paused for a job that then started "
        f"on another node (their pause and restart for nothing)"
        + (f"; more than before commit adc7e3f, {PREVIOUS_PREEMPT[2]} and {PREVIOUS_PREEMPT[1]} of "
           f"{PREVIOUS_PREEMPT[0]}. `_preempt_for` does not look at `held_on` either: a node preempts for the "
           f"first job of the queue it can run even when another node holds GPUs for it" if compare else "")
        + ". Also, preemption is tried only when `choose` "
        f"starts nothing on the node: a job behind the high-priority one that fits the free GPUs starts first "
        f"and bumps its `bypassed` ({pre8.ahead_of_higher} such backfills on 8 nodes, {pre.ahead_of_higher} "
        f"on 1), which the module docstring does not say. One more, latent: a node whose worker slots (one "
        f"per GPU) all run 1-GPU jobs takes no wake-up, so nothing on it can be preempted until one ends "
        f"({pre8.blocked_by_slots} such preemptions missed in this trace).",
    ]
    if db:
        rows = db["rows"]
        biggest = max(r["queue"] for r in rows)
        top = [r for r in rows if r["queue"] == biggest]
        worst = max(top, key=lambda r: r["p99"])
        wait = next(r for r in top if not r["quotas"] and r["case"].startswith("no start"))
        snap = db["snapshot"][biggest][0]
        choose_s = max((r["median"] for r in CHOOSE_ROWS if r["queue"] == biggest), default=float("nan"))
        out.append(
            f"- **Decision time.** `choose` itself stays in microseconds to a millisecond (at most {us(choose_s)} "
            f"median over {biggest:,} queued jobs). The real decision, `start_next`, is mostly the read of the "
            f"whole queue (`queue_snapshot` alone: {ms(snap)} ms median at {biggest:,} jobs; `start_next` "
            f"{ms(wait['median'])} to {ms(max(r['median'] for r in top))} ms) and grows linearly with it; its "
            f"worst p99 here, {ms(worst['p99'])} ms, is {worst['p99'] / interval:.1%} of the "
            f"{interval:.0f} s wake-up interval: one decision stays well under it. But every queued job keeps "
            f"a poller message that calls `start_next` again every {interval:.0f} s while it waits, so the work "
            f"per interval grows with the square of the queue: {biggest:,} queued jobs ask "
            f"{biggest * wait['median']:,.0f} s of decisions per {interval:.0f} s "
            f"(about {biggest * wait['median'] / interval:,.0f} worker slots and database connections busy all "
            f"the time), 1,000 ask "
            + next((f"{1000 * r['median']:.0f} s" for r in rows if r["queue"] == 1000 and not r["quotas"]
                    and r["case"].startswith("no start")), "-")
            + ": from about a thousand queued jobs the polls alone keep more than one worker slot busy (a slot "
              "that runs a job takes no message), and the database reads the whole queue for each of them.")
    return out


def shares(results: list[Result]) -> str:
    jobs = results[0].jobs
    total = sum(j.spec.gpus * j.spec.work for j in jobs)
    return f"{sum(j.spec.gpus * j.spec.work for j in jobs if j.spec.size == '65B') / total:.0%}"


CHOOSE_ROWS: list[dict] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="the Markdown report (printed when not given)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2,000 jobs on 8 nodes, small DB queues")
    parser.add_argument("--load", type=float, default=0.9, help="offered load, of the GPUs (0.9)")
    parser.add_argument("--seeds", type=int, default=8, help="independent weeks on 1 node, pooled (8)")
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs on 8 nodes (10,000)")
    parser.add_argument("--nodes", type=int, default=8, help="nodes of the large scenario (8)")
    parser.add_argument("--no-db", action="store_true", help="skip start_next on Postgres")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.jobs = 1, min(args.jobs, 2000)
    db_sizes = [100, 1000] if args.quick else [100, 1000, 10_000]
    reps = {100: 200, 1000: 100, 10_000: 40} if not args.quick else {100: 20, 1000: 10}
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    shapes = job_shapes()
    interval = DEFAULTS.requeue_delay_s

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    # 1 node x 8 GPUs, a week per seed
    traces1 = [make_trace(seed, shapes, NODE_GPUS, args.load, horizon=WEEK) for seed in range(args.seeds)]
    one: list[Result] = []
    for policy in POLICIES:
        one.append(merged([Simulator(t, 1, policy).run() for t in traces1]))
        say(f"1 node, {policy.name}: {one[-1].wall_s:.1f} s")
    sweep = []
    for limit in (0, 1, 2, 4, 8, 16, UNBOUNDED):
        policy = Policy(f"limit {limit}", "rule", backfill_limit=limit)
        sweep.append((limit, merged([Simulator(t, 1, policy).run() for t in traces1])))
    say("backfill sweep done")
    by_load = []
    for load in (0.6, 0.7, 0.8, args.load):
        traces = traces1 if load == args.load else [make_trace(seed, shapes, NODE_GPUS, load, horizon=WEEK)
                                                    for seed in range(args.seeds)]
        for policy in POLICIES[:4]:
            by_load.append((load, merged([Simulator(t, 1, policy).run() for t in traces])))
    say("load sweep done")

    # N nodes x 8 GPUs, a fixed number of jobs
    trace8 = make_trace(100, shapes, args.nodes * NODE_GPUS, args.load, jobs=args.jobs)
    many: list[Result] = []
    for policy in POLICIES:
        many.append(Simulator(trace8, args.nodes, policy, time_choose=policy.name == "lomo (defaults)").run())
        say(f"{args.nodes} nodes, {policy.name}: {many[-1].wall_s:.1f} s")

    by_load8 = []
    for load in (0.7, 0.8):
        trace = make_trace(100, shapes, args.nodes * NODE_GPUS, load, jobs=args.jobs)
        by_load8 += [(load, Simulator(trace, args.nodes, policy).run()) for policy in POLICIES[:4]]
    by_load8 += [(args.load, r) for r in many[:4]]
    say(f"{args.nodes} nodes, load sweep done")

    choose_rows = time_choose(shapes, db_sizes)
    CHOOSE_ROWS[:] = choose_rows
    say("choose timed")
    db = None
    if not args.no_db:
        db = time_start_next(shapes, db_sizes, reps)
        say("start_next timed")
    total = time.perf_counter() - started

    # ---------------------------------------------------------------------------------------- the report
    cmd = " ".join([".venv/bin/python", "benchmarks/bench_scheduler.py", *sys.argv[1:]])
    comparable = all(getattr(args, k) == v for k, v in PREVIOUS_ARGS.items())  # with PREVIOUS
    lines = [
        "# Scheduler at scale, by simulation",
        "",
        f"Command: `{cmd}`",
        "",
        f"- Machine: {machine()}",
        f"- Code: repo {git_revision()}" + (f"; Postgres {db['postgres']}" if db else ""),
        f"- Total wall time: {total / 60:.1f} min; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} "
        "after (the machine is shared: the database timings' p99 include other processes' bursts)",
        "",
        "A synthetic lab trace replayed through the real scheduling rule (`jobs.scheduler.choose`, "
        "`preemption_victims`, `fits_node`, the service's default settings) on simulated nodes, and the real "
        "database path (`start_next`) timed on Postgres. See the module docstring of "
        "`benchmarks/bench_scheduler.py` for how it works.",
        "",
        "## The jobs",
        "",
        f"GPU counts and peaks from the service's memory model (`lomo_core.memory_model.place`, as "
        f"`jobs.admission.predict_memory` calls it) on {NODE_GPUS} x {CARD_GIB} GiB cards (RTX 3090), LOMO, "
        f"bf16, batch {TRAIN['batch_size']} x {TRAIN['seq_len']} tokens, gradient checkpointing (the LOMO "
        "paper's recipe); LLaMA-1 shapes, built on the meta device (no weights).",
        "",
        "| model | parameters | GPUs | predicted peak per GPU | share of jobs | median run | preemption: "
        "checkpoint / restart |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in SIZES:
        lines.append(f"| LLaMA-{s} | {shapes[s].parameters / 1e9:.2f} B | {shapes[s].gpus} | "
                     f"{shapes[s].peak_bytes / GiB:.2f} GiB | {MIX[s]:.0%} | {MEDIAN_H[s]:g} h (before scaling) | "
                     f"{PAUSE_S[s]:.0f} s / {RESTART_S[s]:.0f} s |")
    prio = ", ".join(f"{p}: {w:.0%}" for p, w in PRIORITIES)
    lines += [
        "",
        f"Arrivals: Poisson with a day/night cycle (rate x (1 + {DAY_SWING} cos(2 pi (hour - {PEAK_HOUR:g}) / 24)), "
        f"busiest at {PEAK_HOUR:g}:00); priorities {prio}; run times lognormal (sigma {SIGMA}) between "
        f"{MIN_RUN_H * 60:.0f} min and {CAP_H:.0f} h, then all scaled by one factor per trace so the offered load "
        f"is exactly {args.load:.0%} of the GPUs over the arrivals.",
        "",
        "Policies:",
        "",
    ]
    lines += [f"- **{p.name}**: {p.note}" for p in POLICIES]
    lines += [
        "",
        "Columns: *GPU utilisation* is the GPU-time leased (running and checkpointing jobs) over GPUs x "
        "makespan (first arrival to last end); *useful* counts only the trace's work (not checkpoints and "
        "restarts after a preemption). *Wait*: from submission to the job's first start. *Backfills*: starts "
        "ahead of a job that waited for more GPUs (each grows its `bypassed`). *Idle while queued*: free GPUs "
        "while jobs were queued, *held* for a job (at the backfill limit, or for a preemption under way) or "
        "*other* (no queued job fitted the free GPUs; for one job per node, the GPUs its job does not use).",
        "",
        f"## 1 node x {NODE_GPUS} GPUs, a week ({args.seeds} independent week(s), pooled)",
        "",
        trace_summary(traces1, NODE_GPUS, WEEK) + ".",
        "",
        *policy_table(one, args.seeds),
        "",
        "Makespan is per week. By priority:",
        "",
        *priority_table(one),
        "",
        f"### The backfill limit, 1 node (`LOMO_BACKFILL_LIMIT`, default {DEFAULTS.backfill_limit}; no preemption)",
        "",
        *sweep_table(sweep),
        "",
        "### The offered load, 1 node",
        "",
        *load_table(by_load, args.seeds),
        "",
        f"## {args.nodes} nodes x {NODE_GPUS} GPUs, {args.jobs:,} jobs",
        "",
        trace_summary([trace8], args.nodes * NODE_GPUS, trace8[-1].arrival) + ".",
        "",
        *policy_table(many, 1),
        "",
        *priority_table(many),
        "",
        f"### The offered load, {args.nodes} nodes ({args.jobs:,} jobs each)",
        "",
        *load_table(by_load8, 1),
        "",
        f"Held for one job on several nodes at once (defaults): at most {many[0].max_nodes_holding_one} "
        f"node(s)" + (f" (before commit adc7e3f: {PREVIOUS_HELD[2]})" if comparable else "")
        + "; jobs at the backfill limit held for (`held_on` "
        f"taken) before their first start: {many[0].holds:,}, {many[0].holds_when_full:,} of them by a node "
        f"with no GPU free at that decision, {many[0].started_on_holder:,} started on the node that held for "
        f"them; GPU-hours held idle for a job on nodes other than the one it then started on: "
        f"{many[0].held_elsewhere_gpu_s / HOUR:.0f} of {many[0].idle_held_gpu_s / HOUR:.0f}"
        + (f" (before: {PREVIOUS_HELD[0]} of {PREVIOUS_HELD[1]})" if comparable else "") + ".",
        "",
        f"### Since the previous report (commit {PREVIOUS_REV}: the rule before commit adc7e3f)",
        "",
        *(["Before adc7e3f every node where a job at the backfill limit fits held its free GPUs for it; now "
           "one node does (`held_on`), the others backfill past it. Each cell: before / now.", "",
           *since_previous(one, many, by_load8)]
          if comparable
          else [f"The previous figures are for the default run ({PREVIOUS_ARGS}); this one differs: not "
                "compared."]),
        "",
        "Simulation speed: " + ", ".join(f"{r.policy.name} {r.decisions:,} decisions in {r.wall_s:.1f} s"
                                         for r in many) + ".",
        "",
        "## Time per scheduling decision",
        "",
        f"The workers' wake-up interval: a queued job's poller calls `start_next` again every `requeue_delay_s` "
        f"= {interval:.0f} s while it waits, and each worker's watch wakes idle GPUs every "
        f"min(`heartbeat_timeout_s` / 4, 30 s) = {min(DEFAULTS.heartbeat_timeout_s / 4, 30):.0f} s; a job that "
        f"ends wakes the workers at once.",
        "",
        f"`choose` inside the {args.nodes}-node simulation (defaults), by queue length (with no GPU free too, "
        "as `_start_next` calls it):",
        "",
        "| queue length | calls | median | p99 | max |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for order, times in sorted(many[0].choose_times.items()):
        lines.append(f"| {10**order:,}-{10**(order + 1) - 1:,} | {len(times):,} | {us(statistics.median(times))} | "
                     f"{us(percentile(times, 99))} | {us(max(times))} |")
    lines += ["", "`choose` alone on queues of the trace's mix (a node of 8 GPUs, backfill limit "
              f"{DEFAULTS.backfill_limit}):", "", "| queued jobs | case | jobs walked at most | median | p99 |",
              "| ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['queue']:,} | {r['case']} | {r['walked']:,} | {us(r['median'])} | {us(r['p99'])} |"
              for r in choose_rows]
    if db:
        lines += ["", "`start_next` on Postgres (127.0.0.1; the real transaction: the queue read, choose, the claim, "
                  "the leases, the events; the client on the same 2 cores), quotas off (`quota_settings` None) and "
                  "on (`quota_running_jobs` 2, 10 of the 50 users at it):", "",
                  "| queued jobs | quotas | case | calls | median | p99 | p99 / wake-up interval | all pollers of "
                  "the queue once (queue x median) |", "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in db["rows"]:
            lines.append(f"| {r['queue']:,} | {'on' if r['quotas'] else 'off'} | {r['case']} | {r['calls']} | "
                         f"{ms(r['median'])} ms | {ms(r['p99'])} ms | {r['p99'] / interval:.3%} | "
                         f"{r['queue'] * r['median']:.1f} s |")
        lines += ["", "Of which the read of the queue (`queue_snapshot`: every queued row, its predicted memory "
                  "JSON included, ordered): " + ", ".join(f"{q:,} jobs {ms(m)} ms (p99 {ms(p)} ms)"
                                                         for q, (m, p) in db["snapshot"].items()) + "."]
    lines += [
        "",
        "## Approximations",
        "",
        "- Decisions are instantaneous and made at events: a real worker decides on a wake-up, within "
        f"{interval:.0f} s of a change at worst (a job's end wakes the workers at once), one decision per "
        "wake-up; here after each event the nodes decide in turn, one decision each per round, the event's "
        "node first (the worker that got the wake-up), until no node starts or preempts anything. No races "
        "between workers (the real transaction retries them). A node whose worker slots (one per GPU) all "
        "run a job decides nothing, as a real one takes no message then.",
        "- `choose` is called with no GPU free too, as `_start_next` calls it: it starts nothing then (every "
        "job needs a GPU), but its `held_for` makes the deciding node a job's `held_on` as in the database "
        "(a full node with an idle worker slot decides too); preemption is then tried as `_start_next` "
        "tries it. (Before commit adc7e3f the simulation skipped that call, which changed nothing then.)",
        "- Preemption: the victim's progress stops when it is asked to pause; it holds its GPUs for the "
        "checkpoint time above, then goes back to the queue at its place (its `bypassed` kept, as in the "
        "database); a restart adds the restart time to its run. The real run checkpoints after the step in "
        "progress, so no work since an earlier checkpoint is lost; the two costs are assumptions. A victim "
        "whose run ends before its checkpoint would be done simply ends.",
        "- Jobs never fail, are never cancelled and never lose their worker; nodes are never lost (every node "
        "is live, so a job's `held_on` stays with the node that took it; `heartbeat_timeout_s` plays no part); "
        "no quotas (one user); every node has the same cards, and every job fits a node.",
        "- Wait is to the first start; a preempted job's time back in the queue is not in it.",
        "- The trace is synthetic (its mix, run times and priorities are assumptions, listed above); the waits "
        "at a load a policy cannot keep up with grow with the trace's length.",
        "- The pollers' load (queue x median) is arithmetic on the measured decision, not measured with workers "
        "and a broker; the database timings ran on a shared 2-core machine, client and server together.",
        "",
        "## Reading",
        "",
        *reading(one, many, by_load8, db, interval, args.load, args.seeds, comparable),
        "",
    ]
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text)
        say(f"written to {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
