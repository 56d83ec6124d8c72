"""Run the provider simulator as a real subprocess, for tests, demos and benchmarks.

    with start_simulator_process(port=0, seed=1, latency_ms=5) as sim:
        client = OpenAI(base_url=sim.base_url, api_key="sk-test")
        sim.queue_faults("500", "429")
        ...

Keyword options map to ``manage.py simulate_provider`` flags: ``latency_ms=5`` →
``--latency-ms 5``; lists/tuples are comma-joined (``faults=["500", "cut"]``).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_LISTENING_RE = re.compile(r"simulator listening on (http://(\[[^\]]+\]|[^:/\s]+):(\d+))/v1")


class SimulatorProcess:
    """A running ``manage.py simulate_provider`` subprocess."""

    def __init__(self, process: subprocess.Popen, host: str, port: int) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.origin = f"http://{host}:{port}"
        self.base_url = f"{self.origin}/v1"
        self.control_url = f"{self.origin}/_sim"
        self.healthz_url = f"{self.origin}/healthz"
        self.output: collections.deque[str] = collections.deque(maxlen=200)

    # control API helpers
    def _control(self, method: str, name: str, json: Any = None) -> Any:
        response = httpx.request(method, f"{self.control_url}/{name}", json=json, timeout=10)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        self._control("POST", "reset")

    def set_faults(self, faults: list[str] | tuple[str, ...] = (), **options: Any) -> dict:
        """Queue faults and/or set overrides (force_cached_tokens, latency_ms, fail_rate, hang_s)."""
        return self._control("POST", "faults", {"faults": list(faults), **options})

    def queue_faults(self, *faults: str) -> dict:
        return self.set_faults(faults)

    def log(self) -> list[dict]:
        return self._control("GET", "log")["entries"]

    def stats(self) -> dict:
        return self._control("GET", "stats")

    # lifecycle
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        return self.process.returncode

    def __enter__(self) -> "SimulatorProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SimulatorProcess pid={self.process.pid} {self.base_url}>"


def _flags(options: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple, set)):
            args += [flag, ",".join(str(v) for v in value)]
        else:
            args += [flag, str(value)]
    return args


def _pump(stream, sink: collections.deque, lines: list | None, event: threading.Event | None) -> None:
    for raw in iter(stream.readline, ""):
        line = raw.rstrip("\n")
        sink.append(line)
        if lines is not None and event is not None and not event.is_set():
            lines.append(line)
            if _LISTENING_RE.search(line):
                event.set()
    stream.close()
    if event is not None:
        event.set()


def start_simulator_process(port: int = 0, timeout: float = 20.0, host: str = "127.0.0.1",
                            **options: Any) -> SimulatorProcess:
    """Start the simulator and wait (at most ``timeout`` s) until it answers GET /healthz.

    With ``port=0`` the child binds a free port itself and the parent reads it from
    the "simulator listening on ..." line, so there is no race for the port."""
    cmd = [sys.executable, str(PROJECT_ROOT / "manage.py"), "simulate_provider",
           "--host", host, "--port", str(port), *_flags(options)]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    process = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    output: collections.deque[str] = collections.deque(maxlen=200)
    lines: list[str] = []
    listening = threading.Event()
    threading.Thread(target=_pump, args=(process.stdout, output, lines, listening), daemon=True).start()
    threading.Thread(target=_pump, args=(process.stderr, output, None, None), daemon=True).start()

    def fail(reason: str) -> None:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
        tail = "\n".join(list(output)[-40:])
        raise RuntimeError(f"simulator {reason} (exit code {process.returncode}); output:\n{tail}")

    deadline = time.monotonic() + timeout
    if not listening.wait(timeout):
        fail(f"did not report listening within {timeout:g}s")
    match = next((m for m in map(_LISTENING_RE.search, lines) if m), None)
    if match is None:
        fail("exited before listening")
    sim = SimulatorProcess(process, match.group(2), int(match.group(3)))
    sim.output = output
    while True:
        try:
            if httpx.get(sim.healthz_url, timeout=2).status_code == 200:
                return sim
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            fail("exited during start-up")
        if time.monotonic() > deadline:
            fail(f"did not answer /healthz within {timeout:g}s")
        time.sleep(0.05)
