"""config/serve.py: worker processes with a listening socket each, so
keep-alive connections spread over them, supervised (a dead worker is
replaced, a dead supervisor takes its workers with it, SIGTERM stops all)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.gateway_overhead import all_listening, connections_held
from tests.conftest import database_url, free_port

ROOT = Path(__file__).resolve().parent.parent
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balancing and /proc are Linux's")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def workers(pid: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's helpers)."""
    out = []
    for child in children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
        except OSError:
            pass
    return out


class Served:
    def __init__(self, *extra: str, workers: int = 2, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.count = workers
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "config.serve", "--port", str(self.port), "--workers", str(workers),
             "--graceful-timeout", "5", *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
        )
        self.wait_for(self.all_serving, what="workers answering")

    def all_serving(self) -> bool:
        """Every worker has joined the port (they do once started) and answers."""
        return all_listening(self.workers(), self.port, self.count) and self.healthy()

    def workers(self) -> list[int]:
        return workers(self.proc.pid)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_for(self, condition, *, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout:g} s")
            time.sleep(0.1)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


@pytest.fixture
def served():
    servers = []

    def start(*extra, **kw) -> Served:
        servers.append(Served(*extra, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@linux_only
def test_keep_alive_connections_spread_over_the_workers_whatever_they_are_doing(served):
    """A client pool connects while one worker is busy (here: stopped). On a
    shared socket (uvicorn --workers) the other worker accepts all of them
    and keeps them; with a socket per worker each gets its share, and the
    busy one serves its own when it comes back."""
    s = served()
    busy, other = s.workers()
    conns = []
    os.kill(busy, signal.SIGSTOP)
    try:
        conns = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(60)]
        time.sleep(1)  # time for the free worker to accept whatever it can
    finally:
        os.kill(busy, signal.SIGCONT)
    try:
        for c in conns:
            c.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\n\r\n".encode())
        for c in conns:
            assert c.recv(4096).startswith(b"HTTP/1.1 200"), "answered, and kept open"
        held = connections_held([busy, other], s.port)
        assert sum(held) == 60
        # Hashed over 2 sockets, 60 connections split 30 +/- 4; 15 is 4 sd away.
        assert min(held) >= 15, f"connections per worker: {held}"
    finally:
        for c in conns:
            c.close()


@linux_only
def test_a_dead_worker_is_replaced_and_serving_goes_on(served):
    """While the replacement starts (seconds on a busy machine), new
    connections go to the live worker only: the replacement joins the port
    when it can answer."""
    s = served()
    first = s.workers()
    os.kill(first[0], signal.SIGKILL)
    s.wait_for(lambda: len(s.workers()) == 2 and first[0] not in s.workers(), what="replacement worker")
    started = time.monotonic()
    while time.monotonic() - started < 3:  # across the replacement's start-up
        assert s.healthy(), "a new connection was not answered within 2 s"
    s.wait_for(lambda: first[0] not in s.workers() and s.all_serving(), what="replacement worker on the port")
    assert s.proc.poll() is None


@linux_only
def test_sigterm_stops_every_worker(served):
    s = served()
    pids = s.workers()
    out = s.stop()
    assert s.proc.returncode == 0, out
    assert "stopped" in out
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@linux_only
def test_workers_follow_a_supervisor_killed_outright(served):
    s = served()
    pids = s.workers()
    s.proc.kill()
    s.proc.wait()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids), "no orphan left accepting on the port"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), timeout=1).close()


@linux_only
def test_a_port_already_served_is_refused_with_a_reason(served):
    s = served(workers=1)
    second = subprocess.run(
        [sys.executable, "-m", "config.serve", "--port", str(s.port), "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert second.returncode == 2
    assert f"already answers on 127.0.0.1:{s.port}" in second.stderr


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--port", "0"], "cannot be 0"),
    (["--port", "http"], "invalid int value"),
])
def test_bad_arguments_are_refused_before_anything_starts(args, message):
    out = subprocess.run([sys.executable, "-m", "config.serve", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr


def test_elsewhere_it_says_to_use_uvicorn_instead(monkeypatch, caplog):
    from config import serve

    monkeypatch.setattr(sys, "platform", "darwin")
    assert serve.main(["--port", "8000"]) == 2
    assert "run uvicorn --workers instead" in caplog.text


def _refused_requests_counted(url: str) -> float:
    """gateway_requests_total summed over its labels, as one scrape reports it."""
    text = httpx.get(f"{url}/metrics", timeout=10).text  # a new connection: either worker may answer
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_requests_total{")
    )


@linux_only
def test_metrics_count_every_worker_s_requests_whichever_answers_the_scrape(served, transactional_db, tmp_path):
    """Each worker counts the requests it serves; a scrape answered by
    either one reports all of them, and a worker that dies takes none of
    its counts with it. Counts left in the directory by an earlier run are
    not added."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_99999.db").write_bytes(b"left over from an earlier run")
    s = served(env={"DATABASE_URL": database_url(), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    for i in range(20):  # a connection each: spread over both workers by the kernel
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                       headers={"Authorization": "Bearer gk_not-a-key", "X-Request-ID": f"metrics-{i}"}, timeout=30)
        assert r.status_code == 401
    assert {_refused_requests_counted(s.url) for _ in range(10)} == {20.0}

    victim = s.workers()[0]
    os.kill(victim, signal.SIGKILL)
    s.wait_for(lambda: victim not in s.workers() and s.all_serving(), what="replacement worker on the port")
    assert {_refused_requests_counted(s.url) for _ in range(10)} == {20.0}
