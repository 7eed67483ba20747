"""The torchrun examples run end to end on CPU (gloo, 2 processes on 127.0.0.1), as the README says.

Each run is bounded in time and its whole process group is killed on failure, so no rank outlives
the test.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script", ["train_ddp.py", "train_fsdp.py"])
def test_torchrun_example_trains_and_saves(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(ROOT / "examples" / script), "--steps", "2", "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    assert "saved adapters to" in out
    assert (tmp_path / "out" / "peftfx_adapters.safetensors").exists()
