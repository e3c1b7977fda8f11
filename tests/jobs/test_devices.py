"""GPU discovery with nvidia-smi (a stand-in executable prints what nvidia-smi prints on a 4-GPU node),
and the device names a training process is given."""

from __future__ import annotations

import stat

import pytest

from jobs.devices import discover_gpus, visible_ids

SMI_OUTPUT = """0, GPU-aaaa1111-0000-0000-0000-000000000000, 24576
1, GPU-bbbb2222-0000-0000-0000-000000000000, 24576
2, GPU-cccc3333-0000-0000-0000-000000000000, 81920
3, GPU-dddd4444-0000-0000-0000-000000000000, 81920
"""


@pytest.fixture
def smi_path(tmp_path):
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\n"
                      'case "$*" in *--query-gpu=index,uuid,memory.total*) ;; *) exit 9;; esac\n'
                      + "".join(f"echo '{line}'\n" for line in SMI_OUTPUT.splitlines()))  # builtins only
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path)


def test_every_gpu_is_found_with_its_memory(smi_path):
    assert discover_gpus({"PATH": smi_path}) == [24.0, 24.0, 80.0, 80.0]


def test_cuda_visible_devices_selects_and_orders_them(smi_path):
    assert discover_gpus({"PATH": smi_path, "CUDA_VISIBLE_DEVICES": "3,1"}) == [80.0, 24.0]
    assert discover_gpus({"PATH": smi_path, "CUDA_VISIBLE_DEVICES": "GPU-cccc3333"}) == [80.0]  # a UUID prefix
    assert discover_gpus({"PATH": smi_path, "CUDA_VISIBLE_DEVICES": "2,7,0"}) == [80.0]  # CUDA stops at 7
    assert discover_gpus({"PATH": smi_path, "CUDA_VISIBLE_DEVICES": ""}) == []


def test_no_nvidia_smi_or_a_failing_one_means_no_gpus(tmp_path):
    assert discover_gpus({"PATH": str(tmp_path)}) == []
    broken = tmp_path / "nvidia-smi"
    broken.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    broken.chmod(0o755)
    assert discover_gpus({"PATH": str(tmp_path)}) == []


def test_a_training_process_is_given_the_workers_own_device_names():
    assert visible_ids([0, 1], {}) == "0,1"
    assert visible_ids([1, 2], {"CUDA_VISIBLE_DEVICES": "4,5,6"}) == "5,6"
    assert visible_ids([0], {"CUDA_VISIBLE_DEVICES": "GPU-cccc3333"}) == "GPU-cccc3333"
