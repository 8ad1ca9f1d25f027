"""Test helper: runs a script as N cooperating JAX processes on localhost (CPU, gloo)."""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_processes(script: str, num: int, *, devices: int = 1, timeout: float = 600) -> list[str]:
    """Starts `python script localhost:PORT num i` for i < num; returns each one's last stdout
    line once all exited 0 (else fails with the stderr of the first that did not)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, script, f"localhost:{port}", str(num), str(i)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num)
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out.strip().splitlines()[-1] for out, _ in outs]
