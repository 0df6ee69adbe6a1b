"""Killing a run at a chosen moment: the crash tests of resume and of the teacher cache share this."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_offline(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `command` from the repository root without the Hub, capturing its output as text."""
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def kill_when_stalled(command: list[str], marker: Path, what: str, timeout: float = 240) -> None:
    """Run `command` until it writes `marker` (where it stalls on purpose), then SIGKILL it with its workers.

    The process gets its own session so that its data-loader workers die with it.
    """
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"{what} ended before it was killed:\n{process.stderr.read()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not stall in time")
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
