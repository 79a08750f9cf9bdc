"""`bridgeway demo` as a new user meets it: it comes up, every curl line of its tour works when
pasted into a shell, and Ctrl-C stops the gateway and the sample services."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

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
    output: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        output.append(line)
        if line.strip() == TOUR_END:
            break
    else:
        proc.kill()
        pytest.fail("the demo did not print its tour:\n" + "".join(output))
    yield proc, output
    if proc.poll() is None:  # the test failed before its Ctrl-C: the demo still stops its samples
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_demo_tour_works_pasted_and_ctrl_c_stops_everything(demo):
    proc, output = demo
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
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert "demo stopped" in rest
    assert not [port for _, _, port, _ in SAMPLES if _busy(port)], "a sample service outlived the demo"
