"""`bridgeway demo` as a new user meets it: it comes up, every curl line of its tour works when
pasted into a shell, and Ctrl-C stops the gateway and the sample services."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from bridgeway.demo import SAMPLES
from tests.support.procs import HOST, free_port

TOUR_END = "Ctrl-C stops everything."


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


@pytest.fixture
def demo():
    busy = [port for _, _, port, _ in SAMPLES if _busy(port)]
    if busy:
        pytest.skip(f"the demo's sample services need ports {busy}, which are in use")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridgeway", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C reaches the terminal's whole process group
        env={**os.environ, "COLUMNS": "60"},  # a narrow terminal: the tour must not wrap
    )
    # Read by a thread: a demo that hangs without printing fails the test instead of hanging it.
    output: list[str] = []
    toured = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            if line.strip() == TOUR_END:
                toured.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if toured.wait(90):
        yield proc, output, reader
    if proc.poll() is None:  # Ctrl-C still stops the demo's samples, which are in sessions of their own
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    if not toured.is_set():
        pytest.fail("the demo did not print its tour:\n" + "".join(output))


def test_the_demo_tour_works_pasted_and_ctrl_c_stops_everything(demo):
    proc, output, reader = demo
    commands = [line.strip() for line in output if line.strip().startswith("curl ")]
    assert len(commands) >= 6, "".join(output)
    answers = {}
    for command in commands:
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and done.stdout, f"{command!r}: {done.returncode} {done.stderr}"
        answers[command] = done.stdout
    echo = json.loads(next(out for cmd, out in answers.items() if "/bridge/echo/" in cmd))
    assert ["x-request-id", "demo-1"] in echo["headers"] and echo["query"] == "x=1"
    assert next(out for cmd, out in answers.items() if "/bridge/nope/" in cmd).count("UNKNOWN_SERVICE") == 1
    assert "best_pit_lap" in next(out for cmd, out in answers.items() if "-X POST" in cmd)

    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends
    proc.wait(30)
    reader.join(5)
    assert proc.returncode == 0, "".join(output)
    assert "demo stopped" in "".join(output)
    assert not [port for _, _, port, _ in SAMPLES if _busy(port)], "a sample service outlived the demo"
