"""Response shapes of ``GET /v1/cluster`` (``jobs.cluster``): the nodes and who holds their GPUs, the queue in
order, and a timeline of GPU leases. Times are unix seconds, as in the rest of the API.

``job`` is the job's id for its owner and admins, null for other users (who see its owner's name, not
its id); ``mine`` marks the caller's own jobs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ClusterGpu(BaseModel):
    index: int
    memory_gib: float
    job: str | None = Field(description="the job that holds it now (null: free, or another user's job)")
    mine: bool
    user: str | None = Field(description="the name of the holder's owner (null: free)")
    since: int | None = Field(description="when the lease it is held by began")


class ClusterRunningJob(BaseModel):
    job: str | None
    mine: bool
    user: str
    gpus: int = Field(description="the devices it trains on: GPUs, or CPU ranks on a CPU node")
    devices: list[int] = Field(description="the GPUs of this node it holds (none on a CPU node)")
    status: Literal["running", "pausing"]
    started_at: int | None


class ClusterNode(BaseModel):
    name: str
    seen_at: int = Field(description="its latest sign of life: its workers' watch of the queue (every quarter of "
                                     "the heartbeat timeout at most), or a heartbeat of a job it runs")
    alive: bool = Field(description="seen within the heartbeat timeout")
    gpus: list[ClusterGpu] = Field(description="empty for a CPU node")
    cpu_bf16_slowdown: float | None = Field(None, description="a CPU node's bf16 matmul time over fp32's, measured "
                                                              "at its workers' start (above 3: bf16 is emulated)")
    running: list[ClusterRunningJob] = Field(description="the jobs it runs now, first started first")


class ClusterQueuedJob(BaseModel):
    position: int = Field(description="1 for the job the scheduler considers first")
    job: str | None
    mine: bool
    user: str
    gpus: int = Field(description="GPUs (or CPU ranks) it needs")
    priority: int
    created_at: int
    preempted: bool = Field(description="it was preempted: it kept its place, and resumes from its checkpoint")
    held_by_quota: bool = Field(description="its owner's running-jobs quota is reached: it starts when one of "
                                            "their jobs ends")
    model: str = Field(description="the model it trains (another user's job: its base model's name)")


class ClusterLease(BaseModel):
    node: str
    device_index: int
    job: str | None
    mine: bool
    user: str
    started_at: int
    released_at: int | None = Field(description="null: held now")


class ClusterObject(BaseModel):
    object: Literal["cluster"] = "cluster"
    now: int
    hours: float = Field(description="the window of the lease timeline")
    since: int = Field(description="the start of the window (now - hours)")
    nodes: list[ClusterNode]
    queue: list[ClusterQueuedJob] = Field(description="the queued jobs in the order the scheduler considers them")
    leases: list[ClusterLease] = Field(description="the GPU leases that overlap the window, oldest first")
    leases_truncated: bool = Field(description="the window held more leases than an answer does: the newest are "
                                               "kept")
