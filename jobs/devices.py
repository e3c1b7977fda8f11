"""The GPUs of this node, discovered with ``nvidia-smi`` when the settings do not declare them.

``nvidia-smi`` is asked rather than CUDA because the worker itself must not create a CUDA context (its
training processes own the GPUs). When the worker runs with ``CUDA_VISIBLE_DEVICES`` (indices or
``GPU-...`` UUIDs), only those devices are the node's, in that order: lease index ``i`` is the ``i``-th
of them, and :func:`visible_ids` maps leased indices back to the names a training process is given.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

log = logging.getLogger("lomo.devices")
QUERY = ["--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"]


def discover_gpus(env: dict[str, str] | None = None, timeout: float = 20.0) -> list[float]:
    """GiB of each GPU this process may use, in ``CUDA_VISIBLE_DEVICES`` order; [] with no NVIDIA GPU
    (no ``nvidia-smi``, or it fails)."""
    env = dict(os.environ if env is None else env)
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        return []
    try:
        done = subprocess.run([smi, *QUERY], capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("nvidia-smi failed (%s): no GPUs discovered", e)
        return []
    if done.returncode != 0:
        log.warning("nvidia-smi exited %d: %s", done.returncode, done.stderr.strip()[:200])
        return []
    devices: dict[str, float] = {}
    order: list[str] = []
    for line in done.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        index, uuid, mib = parts
        try:
            gib = float(mib) / 1024
        except ValueError:
            continue
        devices[index] = devices[uuid] = gib
        order.append(index)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [devices[i] for i in order]
    chosen = []
    for name in (v.strip() for v in visible.split(",") if v.strip()):
        match = devices.get(name) or next((gib for key, gib in devices.items() if key.startswith(name)), None)
        if match is None:
            break  # CUDA stops at the first invalid entry of CUDA_VISIBLE_DEVICES
        chosen.append(match)
    return chosen


def visible_ids(leased: list[int], env: dict[str, str] | None = None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of a training process given the node's devices ``leased``."""
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
    return ",".join(names[i] if names is not None and i < len(names) else str(i) for i in leased)
