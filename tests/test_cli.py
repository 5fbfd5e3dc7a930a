"""`fastdistill info` and the backend selection it reports."""

import subprocess
import sys

import pytest
import torch

import fastdistill
from fastdistill.backend import select_backend


def test_info_lists_ops_devices_and_backend():
    result = subprocess.run([sys.executable, "-m", "fastdistill", "info"], capture_output=True, text=True, check=True)
    out = result.stdout
    assert f"torch             {torch.__version__}" in out
    for op in ("rope", "kv_write", "schedule_chunk_causal", "schedule_block_mask"):
        line = next(line for line in out.splitlines() if line.strip().startswith(op + " "))
        assert "CPU" in line and "Meta" in line
        assert ("CUDA" in line) == bool(fastdistill._C.cuda_archs)  # CUDA kernels exactly in CUDA builds
    assert "cpu   tensors -> reference" in out
    assert "Triton kernels registered" in out


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("FASTDISTILL_BACKEND", raising=False)
    assert select_backend("cpu")[0] == "reference"
    assert select_backend("cuda")[0] == "triton"
    monkeypatch.setenv("FASTDISTILL_BACKEND", "reference")
    assert select_backend("cuda")[0] == "reference"
    monkeypatch.setenv("FASTDISTILL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        select_backend("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("cpu")[0] == "triton"
    monkeypatch.setenv("FASTDISTILL_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTDISTILL_BACKEND must be one of"):
        select_backend("cpu")
