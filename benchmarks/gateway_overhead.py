#!/usr/bin/env python
"""What does the gateway cost? The same closed-loop load, first straight at the
provider simulator and then through the gateway, printed side by side.

    .venv/bin/python benchmarks/gateway_overhead.py                  # Postgres, 1 gateway worker
    .venv/bin/python benchmarks/gateway_overhead.py --workers 2 --stream --json /tmp/bench.json

It sets everything up itself, on loopback only:

1. the database (``--database-url``, Postgres by default): created if missing,
   migrated with ``manage.py migrate`` in a subprocess, then seeded with the model
   catalogue, a ``gateway-bench`` application (no response cache, no rate
   limits) and a fresh API key for this run;
2. the provider simulator (``manage.py simulate_provider --latency-ms 0``) on a
   free port, so the provider adds no think time and every millisecond measured
   is transport plus whatever sits in front of it (``--sim-latency-ms`` to add some);
3. the gateway as deployed: ``python -m config.serve`` (uvicorn workers with a
   listening socket each, uvloop, httptools, ``--workers W``; ``--server uvicorn``
   for uvicorn's own ``--workers``) pointed at the simulator, with access logs
   off and ``LOG_LEVEL=WARNING``.

For each scenario (concurrency x streaming) it runs the load against the
simulator ("direct") and then against the gateway: C workers in a closed loop
(each sends its next request when its previous one is answered), a warm-up
first, then ``--requests`` requests or ``--duration`` seconds, whichever ends
first, in the same loop (the measurement starts while the loop runs, not from
a standing start). Each worker keeps one keep-alive connection and its own
X-Conversation-ID (a multi-turn chat; ``--conversation per-request`` for one
conversation per request). "Added" is the gateway's latency percentile minus
the direct one at the same concurrency (a difference of percentiles, not a
percentile of differences).

The load generator is a minimal asyncio HTTP/1.1 client on uvloop by default
(``--client raw``). httpx is not used for the load because, measured against
the simulator at c=50 on a 2-core machine, it costs ~4 ms of CPU per request
and tops out at a few hundred requests/s: it would measure itself
(``--client httpx`` / ``httpx2`` to see that).

Besides latency it prints the CPU milliseconds per request that each component
(load generator, simulator, gateway, Postgres, everything else on the machine)
spent during each measured phase, read from /proc: where the time goes, and
whether another tenant of a shared machine disturbed the run (``other``).
``--wait-quiet PCT`` waits before each measurement until the machine is idle.

At the end it checks that the gateway recorded exactly one succeeded
``ProviderCall`` per request it answered with a complete 200 (warm-up
included), and that no call was left in progress. The exit status is 0 only if
that holds and no request failed.

Subprocesses are stopped on exit, including on Ctrl-C and SIGTERM.
Results and how to read them: docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/governance_bench"
SIMULATOR_KEY = "sk-simulator-not-a-secret"
APP_SLUG = "gateway-bench"

SYSTEM_PROMPT = (
    "You are Acme's customer support assistant. Answer briefly and politely, in the customer's "
    "language. Never promise refunds or delivery dates; offer to open a ticket instead."
)
QUESTIONS = (
    "Hi, I forgot my password and the reset email never arrives. What can I do?",
    "My order #48213 shows as delivered but I never got the parcel. Can you help?",
    "How do I change the billing address on my account before the next invoice?",
    "Is it possible to downgrade my plan in the middle of the month, and how is it billed?",
    "The mobile app keeps logging me out every few minutes since the last update.",
    "Can I export all my invoices from last year as a single PDF for my accountant?",
    "What is your return policy for items bought during the summer sale?",
    "I was charged twice for the same subscription this month, please check.",
)


# --- small helpers ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _proc_rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pids_named(comm: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    pids.append(int(entry.name))
    return pids


def connections_held(pids: list[int], port: int, *, listening: bool = False) -> list[int]:
    """Established TCP connections on `port` held by each of these processes
    (Linux /proc; zeros elsewhere): how the clients' keep-alive connections
    were spread over the gateway's workers. With listening, the listening
    sockets instead: 1 for each config.serve worker that has joined the port."""
    state = "0A" if listening else "01"
    tcp_rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            tcp_rows += Path(table).read_text().splitlines()[1:]
    established = {f[9] for f in (r.split() for r in tcp_rows)
                   if len(f) > 9 and f[3] == state and int(f[1].rsplit(":", 1)[1], 16) == port}
    held = []
    for pid in pids:
        n = 0
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:[") and target[8:-1] in established:
                        n += 1
        held.append(n)
    return held


def all_listening(workers: list[int], port: int, count: int) -> bool:
    """All `count` config.serve workers are up and each listens on the port
    (they join it once started)."""
    return len(workers) == count and connections_held(workers, port, listening=True) == [1] * count


def serving_pids(pids: list[int]) -> list[int]:
    """The worker processes among a gateway's pids (multiprocessing children),
    or all of them when a single process serves."""
    workers = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
    return workers or pids


def _machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    with contextlib.suppress(OSError):
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        idle = values[3] + values[4]
        return (sum(values) - idle) / _CLK_TCK, sum(values) / _CLK_TCK
    return 0.0, 0.0


async def wait_quiet(threshold_pct: float, max_wait_s: float, window_s: float = 3.0) -> float:
    """On a shared machine: wait until the whole machine was less than
    threshold_pct busy over a window (our idle processes included), at most
    max_wait_s. Returns the last busy figure."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0, t0 = _machine_busy_s()
        await asyncio.sleep(window_s)
        b1, t1 = _machine_busy_s()
        busy = 100 * (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        if busy < threshold_pct or time.monotonic() > deadline:
            return busy
        log(f"    machine {busy:.0f}% busy (other tenants); waiting for < {threshold_pct:g}%")


class CpuMeter:
    """CPU seconds spent by each component between start() and stop(), and by
    the rest of the machine (other tenants of a shared box show up there)."""

    MEMORY_GROUPS = ("simulator", "gateway")
    GROUP_OF_TARGET = {"direct": "simulator", "gateway": "gateway"}

    def __init__(self, groups: dict[str, Callable[[], list[int]]]):
        self.groups = groups  # name -> function returning the pids to count
        self.before: dict[str, dict[int, float]] = {}
        self.machine_before = (0.0, 0.0)
        # Memory: resident size at rest (memory_at_rest: after 50 requests at
        # c=1, before anything else), and the peak during each phase. Python
        # keeps what it allocated, so the growth at the highest concurrency is
        # the figure that means something.
        self.idle_rss: dict[tuple[str, bool], int] = {}
        self.peak_rss: dict[str, int] = {}

    def rss(self) -> dict[str, int]:
        return {name: sum(_proc_rss_bytes(pid) for pid in self.groups[name]()) for name in self.MEMORY_GROUPS}

    async def sample_memory(self, every_s: float = 0.05) -> None:
        """Runs beside a measured phase; keeps the peak resident size."""
        self.peak_rss = self.rss()
        while True:
            await asyncio.sleep(every_s)
            for name, value in self.rss().items():
                self.peak_rss[name] = max(self.peak_rss[name], value)

    def _snapshot(self) -> dict[str, dict[int, float]]:
        return {name: {pid: _proc_cpu_s(pid) for pid in pids()} for name, pids in self.groups.items()}

    def start(self, target: str = "", stream: bool = False) -> None:
        group = self.GROUP_OF_TARGET.get(target)
        if group and (group, stream) not in self.idle_rss:
            self.idle_rss[group, stream] = self.rss()[group]
        self.before = self._snapshot()
        self.machine_before = _machine_busy_s()

    def stop(self) -> dict[str, float]:
        after = self._snapshot()
        busy, total = _machine_busy_s()
        out = {}
        for name, pids in after.items():
            out[name] = sum(cpu - self.before.get(name, {}).get(pid, 0.0) for pid, cpu in pids.items())
        # Each gateway process's share: an uneven split means the listening
        # socket hands connections to one worker more than the other.
        out["gateway_split"] = sorted(
            (round(cpu - self.before.get("gateway", {}).get(pid, 0.0), 3) for pid, cpu in after.get("gateway", {}).items()),
            reverse=True,
        )
        out["machine_busy"] = busy - self.machine_before[0]
        out["machine_total"] = total - self.machine_before[1]
        out["other"] = max(0.0, out["machine_busy"] - sum(out[n] for n in self.groups))
        return out


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- database setup -----------------------------------------------------------


def ensure_database(url: str) -> None:
    """Create the Postgres database named in ``url`` if it does not exist."""
    if not urlsplit(url).scheme.startswith("postgres"):
        return
    from governance.dbsetup import DatabaseUnreachable, Target, ensure_postgres_database

    target = Target.from_url(url)
    try:
        if ensure_postgres_database(target):
            log(f"created database {target.name}")
    except DatabaseUnreachable as exc:
        raise SystemExit(str(exc)) from None


def migrate(env: dict) -> None:
    log("migrating")
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "manage.py"), "migrate", "--noinput", "-v", "0"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"migrate failed:\n{proc.stdout}\n{proc.stderr}")


def vacuum(url: str) -> None:
    """What autovacuum does in production between bursts. Some machines (this
    project's CI VM among them) run Postgres with autovacuum off; then every
    run leaves dead rows behind (each request updates its call, conversation
    and budget rows), and later scenarios would measure that bloat."""
    if not url.startswith("postgres"):
        return
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("VACUUM (ANALYZE)")


def django_setup(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
    os.environ["LOG_LEVEL"] = "WARNING"
    import django

    django.setup()


def seed(run_id: str, *, with_budgets: bool = False, with_rate_limits: bool = False) -> tuple[str, int]:
    """Catalogue, the bench application and a fresh key; returns (secret, key id).

    With budgets, the key belongs to a second application whose every request
    is reserved and settled against three budgets (application, key, step) and
    evaluated against a degradation ladder (a rung at 90 % that never fires).
    With rate limits, the application and the key get request and token limits
    per minute far above what the run sends: counted in Redis for every
    request, never reached."""
    from budgets.catalogue import seed_catalogue
    from governance.models import Application
    from governance.services import create_api_key

    seed_catalogue()
    slug = APP_SLUG + ("-budgets" if with_budgets else "")
    app = Application.objects.filter(slug=slug).first()
    if app is None:
        app = Application.objects.create(
            slug=slug, name="Gateway overhead benchmark" + (" (budgets)" if with_budgets else ""),
            default_model="gpt-4o-mini", status=Application.Status.PILOT,
        )
    # No response cache on the benchmark application: every request must go
    # to the provider. Rate limits only when asked, and never reached.
    limit_rpm, limit_tpm = (10**9, 2 * 10**9) if with_rate_limits else (None, None)
    changed = []
    for field, neutral in (("response_cache_ttl_s", 0), ("requests_per_minute", limit_rpm), ("tokens_per_minute", limit_tpm)):
        if hasattr(app, field) and getattr(app, field) != neutral:
            setattr(app, field, neutral)
            changed.append(field)
    if changed:
        app.save(update_fields=changed)
    issued = create_api_key(application=app, name=f"benchmark run {run_id}")
    if with_rate_limits:
        issued.api_key.requests_per_minute, issued.api_key.tokens_per_minute = limit_rpm, limit_tpm
        issued.api_key.save(update_fields=["requests_per_minute", "tokens_per_minute"])
    if with_budgets:
        from decimal import Decimal

        from budgets.models import Budget, DegradationRule

        big = Decimal("1000000")
        Budget.objects.get_or_create(name="bench: application, monthly", scope="application", application=app,
                                     defaults={"period": "month", "limit_usd": big})
        Budget.objects.create(name=f"bench: key {issued.api_key.prefix}, daily", scope="api_key", api_key=issued.api_key,
                              period="day", limit_usd=big, limit_tokens=10**12)
        Budget.objects.get_or_create(name="bench: step answer, daily", scope="step", application=app, step="answer",
                                     defaults={"period": "day", "limit_usd": big, "timezone": "Europe/Paris"})
        DegradationRule.objects.get_or_create(application=app, threshold_percent=90, defaults={"switch_to_model": "gpt-4.1-nano"})
    return issued.secret, issued.api_key.pk


def database_info() -> dict:
    from django.db import connection

    info = {"vendor": connection.vendor}
    with connection.cursor() as cur:
        if connection.vendor == "postgresql":
            cur.execute("SELECT version()")
            info["version"] = cur.fetchone()[0].split(" on ")[0]
            for name in ("synchronous_commit", "fsync", "shared_buffers"):
                cur.execute(f"SHOW {name}")
                info[name] = cur.fetchone()[0]
        elif connection.vendor == "sqlite":
            cur.execute("SELECT sqlite_version()")
            info["version"] = "SQLite " + cur.fetchone()[0]
    connection.close()
    return info


def recorded_calls(api_key_id: int, attempts: int = 3) -> dict[str, int]:
    """ProviderCall rows of this run's key, by status. Retried: a pooled
    connection may have been closed by the server while the load ran."""
    from django.db import DatabaseError, connection
    from django.db.models import Count

    from conversations.models import ProviderCall

    for attempt in range(attempts):
        try:
            rows = ProviderCall.objects.filter(api_key_id=api_key_id).values("status").annotate(n=Count("id"))
            return {r["status"]: r["n"] for r in rows}
        except DatabaseError:
            if attempt == attempts - 1:
                raise
            time.sleep(1)
        finally:
            connection.close()
    return {}


# --- subprocesses --------------------------------------------------------------


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group a server was started in (start_new_session),
    then SIGKILL it if it has not exited within 15 s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


class Gateway:
    """uvicorn serving config.asgi:application as a subprocess (its own session,
    so a Ctrl-C in the terminal reaches only us and we stop it in order)."""

    def __init__(self, *, workers: int, env: dict, app: str = "config.asgi:application", server: str = "serve",
                 startup_timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = tempfile.NamedTemporaryFile(prefix="gateway-bench-", suffix=".log", delete=False)
        common = ["--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers),
                  "--loop", "uvloop", "--http", "httptools", "--log-level", "warning", "--lifespan", "off"]
        if server == "serve":  # what deploy/Procfile runs: a listening socket per worker
            cmd = [sys.executable, "-m", "config.serve", "--app", app, *common]
        else:  # uvicorn's own workers, sharing one listening socket
            cmd = [sys.executable, "-m", "uvicorn", app, "--no-access-log", *common]
        self.server, self.workers = server, workers
        self.proc = subprocess.Popen(
            cmd, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=self.logfile, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            self._wait_healthy(startup_timeout)
        except BaseException:  # never leave a server behind, even on Ctrl-C during start-up
            self.stop(keep_log=True)
            raise

    def _wait_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode} (log {self.logfile.name}):\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200 and self._all_listening():
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not answer /healthz within {timeout:g}s:\n{self.tail()}")
            time.sleep(0.1)

    def _all_listening(self) -> bool:
        """config.serve's workers join the port once started: the load's
        connections must not all go to the first one up."""
        if self.server != "serve" or self.workers < 2 or not sys.platform.startswith("linux"):
            return True
        return all_listening(serving_pids(self.pids()[1:]), self.port, self.workers)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(Path(self.logfile.name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """The supervisor and, with --workers > 1, its worker processes."""
        pids = [self.proc.pid]
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
                pids.append(int(child))
        return pids

    def stop(self, keep_log: bool = False) -> None:
        stop_process_group(self.proc)
        self.logfile.close()
        if not keep_log:
            with contextlib.suppress(OSError):
                os.unlink(self.logfile.name)


# --- load generator ------------------------------------------------------------


@dataclasses.dataclass
class Target:
    name: str  # "direct" | "gateway"
    host: str
    port: int
    path: str
    auth: str


@dataclasses.dataclass
class Outcome:
    ok: bool
    latency: float
    first_byte: float | None = None
    error: str = ""
    server_timing: str = ""  # the gateway's Server-Timing header (its phases, in ms)
    sent: float = 0.0  # seconds after the phase started; for --timeline
    worker: int = 0


class RawConnection:
    """One keep-alive HTTP/1.1 connection. Understands exactly what the two
    servers send: Content-Length bodies and chunked bodies (SSE streams)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, head: bytes, body: bytes, t0: float) -> tuple[int, bytes, bytes, float | None]:
        if self.writer is None:
            await self._connect()
        self.writer.write(head + body)
        reader = self.reader
        raw_head = await reader.readuntil(b"\r\n\r\n")
        status = int(raw_head[9:12])
        length = None
        chunked = False
        close = False
        for line in raw_head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        first_byte = None
        if chunked:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    break
                data = await reader.readexactly(size + 2)
                if first_byte is None:
                    first_byte = time.perf_counter() - t0
                parts.append(data[:-2])
            payload = b"".join(parts)
        elif length is not None:
            payload = await reader.readexactly(length)
        else:
            payload = await reader.read()
            close = True
        if close:
            self.close()
        return status, raw_head, payload, first_byte


def request_body(i: int, *, model: str, max_tokens: int, stream: bool) -> bytes:
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
        ],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


def header(head: bytes, name: bytes) -> str | None:
    """A response header's value from the raw head (name in lower case), or None."""
    lower = head.lower()
    at = lower.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    start = at + len(name) + 3
    return head[start:lower.find(b"\r\n", start)].strip().decode("latin-1")


def check_payload(status: int, payload: bytes, stream: bool, head: bytes | None = None) -> str:
    """'' if the answer is a complete, successful one; else an error label.
    With the gateway's response head, its outcome must also be 'answered'
    (a polite failure reply is a 200 too)."""
    if status != 200:
        return f"http_{status}"
    if head is not None:
        outcome = header(head, b"x-governance-outcome")
        if outcome is not None and outcome.lower() != "answered":
            return "outcome_" + outcome.lower()
    if stream:
        if not payload.rstrip().endswith(b"data: [DONE]"):
            return "incomplete_stream"
        if b'"error"' in payload:
            return "stream_error"
        return ""
    if not payload.startswith(b"{") or b'"choices"' not in payload:
        return "malformed_body"
    return ""


class Load:
    """A closed loop of C workers against one target."""

    def __init__(self, target: Target, *, concurrency: int, stream: bool, client: str, model: str,
                 max_tokens: int, timeout: float, conversation_prefix: str, per_request_conversation: bool,
                 ramp_s: float = 0.0):
        self.t = target
        self.ramp_s = ramp_s
        self.c = concurrency
        self.stream = stream
        self.client_kind = client
        self.timeout = timeout
        self.prefix = conversation_prefix
        self.per_request_conversation = per_request_conversation
        self.bodies = [request_body(i, model=model, max_tokens=max_tokens, stream=stream) for i in range(len(QUESTIONS))]
        self.conns = [RawConnection(target.host, target.port) for _ in range(concurrency)]
        self.httpx_client = None
        self.seq = itertools.count()
        self.answered_200 = 0  # complete 200 answers, warm-up included (for the record check)

    def _conversation(self, worker: int, n: int) -> str:
        return f"{self.prefix}-{n}" if self.per_request_conversation else f"{self.prefix}-w{worker}"

    async def _one_raw(self, worker: int, n: int) -> Outcome:
        body = self.bodies[n % len(self.bodies)]
        head = (
            f"POST {self.t.path} HTTP/1.1\r\nHost: {self.t.host}:{self.t.port}\r\n"
            f"Authorization: Bearer {self.t.auth}\r\nContent-Type: application/json\r\n"
            f"Accept: {'text/event-stream' if self.stream else 'application/json'}\r\n"
            f"X-Conversation-ID: {self._conversation(worker, n)}\r\nX-Step: answer\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        conn = self.conns[worker]
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                status, resp_head, payload, first = await conn.request(head, body, t0)
        except (TimeoutError, asyncio.TimeoutError):
            conn.close()
            return Outcome(False, time.perf_counter() - t0, error="timeout")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            conn.close()
            return Outcome(False, time.perf_counter() - t0, error=f"conn_{type(exc).__name__}")
        latency = time.perf_counter() - t0
        error = check_payload(status, payload, self.stream, resp_head)
        return Outcome(not error, latency, first, error, server_timing=header(resp_head, b"server-timing") or "")

    async def _one_httpx(self, worker: int, n: int) -> Outcome:
        import importlib

        httpx = importlib.import_module(self.client_kind)  # httpx, or its fork httpx2 (same API)
        if self.httpx_client is None:
            self.httpx_client = httpx.AsyncClient(
                base_url=f"http://{self.t.host}:{self.t.port}",
                timeout=self.timeout,
                limits=httpx.Limits(max_connections=self.c, max_keepalive_connections=self.c),
            )
        body = self.bodies[n % len(self.bodies)]
        headers = {
            "Authorization": f"Bearer {self.t.auth}", "Content-Type": "application/json",
            "X-Conversation-ID": self._conversation(worker, n), "X-Step": "answer",
        }
        t0 = time.perf_counter()
        first = None
        try:
            if self.stream:
                parts = []
                async with self.httpx_client.stream("POST", self.t.path, content=body, headers=headers) as resp:
                    async for chunk in resp.aiter_raw():
                        if first is None:
                            first = time.perf_counter() - t0
                        parts.append(chunk)
                status, payload = resp.status_code, b"".join(parts)
            else:
                resp = await self.httpx_client.post(self.t.path, content=body, headers=headers)
                status, payload = resp.status_code, resp.content
            outcome = resp.headers.get("x-governance-outcome")
            resp_head = f"\r\nx-governance-outcome: {outcome}\r\n".encode("latin-1") if outcome else None
        except httpx.TimeoutException:
            return Outcome(False, time.perf_counter() - t0, error="timeout")
        except httpx.HTTPError as exc:
            return Outcome(False, time.perf_counter() - t0, error=f"conn_{type(exc).__name__}")
        latency = time.perf_counter() - t0
        error = check_payload(status, payload, self.stream, resp_head)
        return Outcome(not error, latency, first, error)

    async def phase(
        self, n_requests: int, duration: float, meter: CpuMeter | None = None, *, warmup: int = 0
    ) -> tuple[list[Outcome], float, dict | None]:
        """Send warmup + n_requests (or until duration passes after the warm-up)
        with C workers; returns the outcomes of the last n_requests, their wall
        time and (with a meter) the CPU spent meanwhile. Warm-up and measurement
        are one closed loop: the measurement starts with the first request sent
        after the warm-up ones, while the loop is running, not from a standing
        start (a barrier between them would release all C workers in the same
        millisecond again and measure that burst)."""
        one = self._one_raw if self.client_kind == "raw" else self._one_httpx
        outcomes: list[Outcome] = []
        tickets = iter(range(warmup + n_requests))
        sampler = None
        start = deadline = None

        def begin_measuring() -> float:
            nonlocal sampler, deadline
            if meter is not None:
                meter.start(self.t.name, self.stream)
                sampler = asyncio.ensure_future(meter.sample_memory())
            t = time.perf_counter()
            deadline = t + duration
            return t

        if warmup == 0:
            start = begin_measuring()
        else:
            deadline = time.perf_counter() + duration  # the warm-up's own cap
        last_done = time.perf_counter()

        async def worker(w: int) -> None:
            nonlocal start, last_done
            if self.ramp_s:
                await asyncio.sleep(self.ramp_s * w / self.c)
            for ticket in tickets:
                if ticket == warmup and warmup:
                    start = begin_measuring()
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                sent = time.perf_counter()
                out = await one(w, next(self.seq))
                if out.ok:
                    self.answered_200 += 1
                if ticket < warmup:
                    continue
                last_done = time.perf_counter()
                out.sent, out.worker = sent - start, w
                outcomes.append(out)

        await asyncio.gather(*(worker(w) for w in range(self.c)))
        if start is None:
            raise SystemExit(f"{self.t.name}: the warm-up of {warmup} requests did not finish within {duration:g} s")
        wall = last_done - start
        if sampler is None:
            return outcomes, wall, None
        sampler.cancel()
        cpu = meter.stop()
        group = meter.GROUP_OF_TARGET[self.t.name]
        cpu["memory"] = {group: {"idle_bytes": meter.idle_rss[group, self.stream], "peak_bytes": meter.peak_rss[group]}}
        return outcomes, wall, cpu

    async def close(self) -> None:
        for conn in self.conns:
            conn.close()
        if self.httpx_client is not None:
            await self.httpx_client.aclose()


def summarise(outcomes: list[Outcome], wall: float) -> dict:
    ok = sorted(o.latency * 1000 for o in outcomes if o.ok)
    first = sorted(o.first_byte * 1000 for o in outcomes if o.ok and o.first_byte is not None)
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            errors[o.error] = errors.get(o.error, 0) + 1
    out = {
        "requests": len(outcomes),
        "succeeded": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "wall_s": round(wall, 3),
        "req_per_s": round(len(ok) / wall, 1) if wall > 0 else 0.0,
        "latency_ms": {
            "mean": round(sum(ok) / len(ok), 3) if ok else None,
            "min": round(ok[0], 3) if ok else None,
            "p50": round(percentile(ok, 50), 3),
            "p95": round(percentile(ok, 95), 3),
            "p99": round(percentile(ok, 99), 3),
            "max": round(ok[-1], 3) if ok else None,
        },
    }
    if first:
        out["first_chunk_ms"] = {q: round(percentile(first, float(q[1:])), 3) for q in ("p50", "p95", "p99")}
    phases = phase_percentiles(outcomes)
    if phases:
        out["phases_ms"] = phases
    return out


PHASES = ("admit", "open", "provider", "record", "outside")


def phase_percentiles(outcomes: list[Outcome]) -> dict:
    """p50/p95/p99 of each phase the gateway reported in Server-Timing, and
    of 'outside': the client's latency minus the gateway's own total (the HTTP
    server, the event loop before the request reached the app, the sockets)."""
    samples: dict[str, list[float]] = {}
    for o in outcomes:
        if not (o.ok and o.server_timing):
            continue
        timing = {}
        for part in o.server_timing.split(","):
            name, _, dur = part.strip().partition(";dur=")
            with contextlib.suppress(ValueError):
                timing[name] = float(dur)
        if "total" in timing:
            timing["outside"] = max(0.0, o.latency * 1000 - timing["total"])
        for name, ms in timing.items():
            samples.setdefault(name, []).append(ms)
    return {
        name: {q: round(percentile(sorted(v), float(q[1:])), 1) for q in ("p50", "p95", "p99")}
        for name, v in samples.items() if name in PHASES
    }


def cpu_summary(cpu: dict, requests: int) -> dict:
    """CPU milliseconds per request for each component, and how busy the machine was."""
    per = {name: round(sec * 1000 / requests, 3) if requests else None
           for name, sec in cpu.items() if name not in ("machine_busy", "machine_total", "memory", "gateway_split")}
    busy = round(100 * cpu["machine_busy"] / cpu["machine_total"], 1) if cpu["machine_total"] else None
    total = sum(cpu.get("gateway_split", ()))
    split = [round(100 * s / total) for s in cpu.get("gateway_split", ()) if total and s / total >= 0.01]
    return {"ms_per_request": per, "machine_busy_pct": busy, "memory": cpu.get("memory", {}), "gateway_split_pct": split}


def calls_recorded_in_total() -> int:
    from conversations.models import ProviderCall

    return ProviderCall.objects.count()


async def prefill(args, target: Target, run_id: str) -> int:
    """A production database has history; an empty one does not behave like it
    (the planner picks sequential scans for tables it last saw nearly empty, and
    those plans stay cached while the tables grow). Bring the database up to
    --prefill calls through the gateway itself, untimed, then VACUUM ANALYZE."""
    have = await asyncio.to_thread(calls_recorded_in_total)
    missing = args.prefill - have
    if missing <= 0 or "gateway" not in args.targets:
        return 0
    log(f"prefill: the database has {have} calls; sending {missing} untimed requests through the gateway")
    load = Load(target, concurrency=50, stream=False, client=args.client, model=args.model, max_tokens=args.max_tokens,
                timeout=args.timeout, conversation_prefix=f"bench-{run_id}-prefill", per_request_conversation=False)
    try:
        await load.phase(missing, duration=300)
    finally:
        await load.close()
    await asyncio.to_thread(vacuum, args.database_url)
    return load.answered_200


async def memory_at_rest(args, targets: dict[str, Target], run_id: str, meter: CpuMeter) -> int:
    """Each target's resident size after 50 requests at c=1 (code paths,
    encodings and pools loaded; one request at a time), taken before anything
    else runs: the prefill and higher concurrencies grow it for good."""
    answered = 0
    for name in args.targets:
        load = Load(targets[name], concurrency=1, stream=False, client=args.client, model=args.model,
                    max_tokens=args.max_tokens, timeout=args.timeout, conversation_prefix=f"bench-{run_id}-rest",
                    per_request_conversation=False)
        try:
            await load.phase(50, duration=60)
        finally:
            await load.close()
        group = meter.GROUP_OF_TARGET[name]
        rest = meter.rss()[group]
        meter.idle_rss[group, False] = meter.idle_rss[group, True] = rest
        if name == "gateway":
            answered += load.answered_200
    return answered


async def run_scenarios(args, targets: dict[str, Target], run_id: str, meter: CpuMeter) -> tuple[list[dict], int]:
    results = []
    gateway_answered = await memory_at_rest(args, targets, run_id, meter)
    gateway_answered += await prefill(args, targets["gateway"], run_id)
    modes = [False, True] if args.stream else [False]
    for stream in modes:
        for c in args.concurrency:
            n = args.requests or (300 if c == 1 else 2000)
            warmup = max(args.warmup, 2 * c)
            label = f"c={c:<3d}{'stream' if stream else 'non-stream'}"
            row = {"scenario": label.replace("  ", " ").strip(), "concurrency": c, "stream": stream,
                   "requests_planned": n, "warmup": warmup}
            for name in args.targets:
                load = Load(
                    targets[name], concurrency=c, stream=stream, client=args.client, model=args.model,
                    max_tokens=args.max_tokens, timeout=args.timeout,
                    conversation_prefix=f"bench-{run_id}-{'s' if stream else 'n'}{c}",
                    per_request_conversation=args.conversation == "per-request", ramp_s=args.ramp_s,
                )
                try:
                    log(f"  {label} {name}: warm-up {warmup}, then {n} requests (cap {args.duration:g}s)")
                    if name == "gateway" and args.vacuum:
                        await asyncio.to_thread(vacuum, args.database_url)
                    if args.wait_quiet:
                        quiet = await wait_quiet(args.wait_quiet, args.wait_quiet_max)
                    outcomes, wall, cpu = await load.phase(n, args.duration, meter, warmup=warmup)
                    if name == "gateway" and meter is not None:
                        spread = connections_held(serving_pids(meter.groups["gateway"]()), targets[name].port)
                finally:
                    await load.close()
                if args.timeline:
                    write_timeline(args.timeline, row["scenario"], name, outcomes)
                row[name] = summarise(outcomes, wall)
                row[name]["cpu"] = cpu_summary(cpu, len(outcomes))
                if name == "gateway" and meter is not None:
                    row[name]["connections_per_process"] = spread
                lat = row[name]["latency_ms"]
                log(f"    {row[name]['req_per_s']:.0f} req/s, p50 {fmt(lat['p50'])} ms, p95 {fmt(lat['p95'])} ms, "
                    f"p99 {fmt(lat['p99'])} ms, {row[name]['errors']} errors {row[name]['error_kinds'] or ''}")
                if args.wait_quiet:
                    row[name]["cpu"]["machine_busy_pct_before"] = round(quiet, 1)
                if name == "gateway":
                    gateway_answered += load.answered_200
            if "direct" in row and "gateway" in row:
                d, g = row["direct"]["latency_ms"], row["gateway"]["latency_ms"]
                row["added_ms"] = {q: round(g[q] - d[q], 3) for q in ("p50", "p95", "p99")}
            results.append(row)
    return results, gateway_answered


def write_timeline(directory: str, scenario: str, target: str, outcomes: list[Outcome]) -> None:
    """One line per measured request: when each worker sent it and how long it
    took. With a fixed provider latency a closed loop's requests can travel in
    waves; a histogram of the send times shows whether they do."""
    os.makedirs(directory, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9]+", "-", f"{scenario}-{target}").strip("-")
    with open(os.path.join(directory, f"{name}.tsv"), "w") as fh:
        fh.write("worker\tsent_ms\tlatency_ms\tfirst_chunk_ms\tok\tserver_timing\n")
        for o in sorted(outcomes, key=lambda o: o.sent):
            first = "" if o.first_byte is None else f"{o.first_byte * 1000:.1f}"
            fh.write(f"{o.worker}\t{o.sent * 1000:.1f}\t{o.latency * 1000:.1f}\t{first}\t{int(o.ok)}\t{o.server_timing}\n")


# --- report --------------------------------------------------------------------


def cpu_calibration_ms() -> float:
    """How long this machine takes, right now, for a fixed pure-Python loop
    (the best of three). Shared VMs vary two- to threefold between hours;
    printed with every run, it says which figures can be compared."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 1)


def machine_info(args, db: dict) -> dict:
    import django
    import uvicorn

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu_model,
        "os": platform.platform(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "uvicorn": uvicorn.__version__,
        "uvicorn_workers": args.workers,
        "server": args.server,
        "database": db,
        "load_client": args.client,
        "simulator_latency_ms": args.sim_latency_ms,
        "simulator_jitter_ms": args.sim_jitter_ms,
        "ramp_s": args.ramp_s,
        "gateway_redis": bool(args.redis_url or os.environ.get("REDIS_URL")),
        "rate_limits": args.rate_limits,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "cpu_calibration_ms_at_start": cpu_calibration_ms(),
    }


def fmt(v: float | None, signed: bool = False) -> str:
    if v is None or v != v:
        return "—"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def table(results: list[dict]) -> str:
    lines = [f"{'scenario':<16}{'target':<9}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}{'n':>7}"]
    for row in results:
        for name in ("direct", "gateway"):
            if name not in row:
                continue
            r = row[name]
            lat = r["latency_ms"]
            lines.append(
                f"{row['scenario']:<16}{name:<9}{r['req_per_s']:>9.0f}{fmt(lat['p50']):>9}"
                f"{fmt(lat['p95']):>9}{fmt(lat['p99']):>9}{r['errors']:>8}{r['requests']:>7}"
            )
        a = row.get("added_ms")
        if a is None:
            continue
        lines.append(
            f"{row['scenario']:<16}{'added':<9}{'—':>9}{fmt(a['p50'], True):>9}"
            f"{fmt(a['p95'], True):>9}{fmt(a['p99'], True):>9}{'—':>8}{'':>7}"
        )
    return "\n".join(lines)


def print_report(info: dict, results: list[dict], check: dict) -> None:
    db = info["database"]
    print()
    print(
        f"machine: {info['cores']} cores ({info['cpu'] or 'unknown cpu'}), Python {info['python']}, "
        f"Django {info['django']}, uvicorn {info['uvicorn']} x{info['uvicorn_workers']} worker(s) ({info['server']}), "
        f"database {db.get('version', db['vendor'])}"
        + (f" (synchronous_commit={db['synchronous_commit']}, fsync={db['fsync']})" if "fsync" in db else "")
    )
    print(f"load average before the run: {info['loadavg_at_start']}; CPU calibration (2M-iteration Python loop, best of 3): "
          f"{info['cpu_calibration_ms_at_start']} ms at start, {info.get('cpu_calibration_ms_at_end', '?')} ms at the end")
    print(f"load: closed loop, one keep-alive connection per worker, client={info['load_client']}"
          + (f", workers started over {info['ramp_s']:g} s" if info.get("ramp_s") else ", workers started together")
          + "; "
          f"simulator --latency-ms {info['simulator_latency_ms']:g}"
          + (f" --jitter-ms {info['simulator_jitter_ms']:g}" if info.get("simulator_jitter_ms") else "")
          + "; latency = request sent -> full answer read; "
          f"shared cache: {'Redis' if info['gateway_redis'] else 'per-process memory'}"
          + ("; rate limits per key and application (never reached)" if info.get("rate_limits") else ""))
    print()
    print(table(results))
    for row in results:
        if row["stream"] and "first_chunk_ms" in row.get("gateway", {}):
            d, g = row.get("direct", {}).get("first_chunk_ms", {}), row["gateway"]["first_chunk_ms"]
            print(f"{row['scenario']}: first chunk p50 direct {fmt(d.get('p50'))} ms, gateway {fmt(g['p50'])} ms")
        for name in ("direct", "gateway"):
            if name in row and row[name]["error_kinds"]:
                print(f"{row['scenario']} {name} errors: {row[name]['error_kinds']}")
    phased = [row for row in results if row.get("gateway", {}).get("phases_ms")]
    if phased:
        print()
        print("Where the gateway's time went (its Server-Timing header; 'outside' = client latency minus the gateway's")
        print("total: HTTP server, event loop, sockets), ms p50 / p99:")
        print(f"{'scenario':<16}" + "".join(f"{n:>16}" for n in PHASES))
        for row in phased:
            ph = row["gateway"]["phases_ms"]
            cells = (f"{fmt(ph[n]['p50'])} / {fmt(ph[n]['p99'])}" if n in ph else "—" for n in PHASES)
            print(f"{row['scenario']:<16}" + "".join(f"{c:>16}" for c in cells))
    print()
    print("CPU ms per request during the measured phase (all cores; 'other' = rest of the machine):")
    names = ("loadgen", "simulator", "gateway", "postgres", "other")
    print(f"{'scenario':<16}{'target':<9}" + "".join(f"{n:>10}" for n in names) + f"{'busy %':>8}")
    for row in results:
        for name in ("direct", "gateway"):
            if name not in row:
                continue
            cpu = row[name]["cpu"]
            per = cpu["ms_per_request"]
            split = cpu.get("gateway_split_pct") if name == "gateway" else None
            conns = row[name].get("connections_per_process") or []
            print(f"{row['scenario']:<16}{name:<9}" + "".join(f"{fmt(per.get(n)):>10}" for n in names)
                  + f"{fmt(cpu['machine_busy_pct']):>8}"
                  + (f"   gateway processes: {' / '.join(f'{p}%' for p in split)}" if split and len(split) > 1 else "")
                  + (f", connections {' / '.join(map(str, conns))}" if len(conns) > 1 else ""))
    print()
    print("Memory (resident, all processes of the target): at rest (after 50 requests at c=1, before the rest), peak")
    print("during the phase, and the growth over rest divided by the requests in flight (read it at the highest c):")
    print(f"{'scenario':<16}{'target':<9}{'rest MB':>10}{'peak MB':>10}{'KB per in-flight':>18}")
    for row in results:
        for name, group in (("direct", "simulator"), ("gateway", "gateway")):
            mem = row.get(name, {}).get("cpu", {}).get("memory", {}).get(group)
            if not mem or row["concurrency"] == 1:
                continue
            grow = max(0, mem["peak_bytes"] - mem["idle_bytes"]) / row["concurrency"] / 1024
            row[name]["kb_per_in_flight"] = round(grow, 1)
            print(f"{row['scenario']:<16}{name:<9}{mem['idle_bytes'] / 2**20:>10.1f}{mem['peak_bytes'] / 2**20:>10.1f}{grow:>18.1f}")
    print()
    verdict = "OK" if check["consistent"] else "MISMATCH"
    print(
        f"record check: gateway answered {check['answered_200']} requests with a complete 200 "
        f"(warm-up included); ProviderCall rows for this run's key by status: {check['by_status']} -> {verdict}"
    )


# --- main ----------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=DEFAULT_DATABASE_URL,
                   help=f"database the gateway records into (default {DEFAULT_DATABASE_URL}); created and migrated if needed")
    p.add_argument("--redis-url", default="",
                   help="REDIS_URL for the gateway (shared rate-limit windows, breakers, cache); default unset: per-process memory")
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    p.add_argument("--server", choices=("serve", "uvicorn"), default="serve",
                   help="serve (default): python -m config.serve, as deployed, a listening socket per worker; "
                        "uvicorn: uvicorn --workers, one socket shared by the workers")
    p.add_argument("--concurrency", default="1,50", help="comma-separated concurrency levels (default 1,50)")
    p.add_argument("--requests", type=int, default=None,
                   help="measured requests per scenario and target (default 300 at c=1, 2000 otherwise)")
    p.add_argument("--duration", type=float, default=30.0, help="cap in seconds per scenario and target (default 30)")
    p.add_argument("--prefill", type=int, default=5000, metavar="CALLS",
                   help="first bring the database up to this many recorded calls, untimed (default 5000)")
    p.add_argument("--no-vacuum", dest="vacuum", action="store_false",
                   help="do not VACUUM the database before each gateway scenario (default: vacuum, as autovacuum would)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up requests before each measurement (at least 2*C)")
    p.add_argument("--stream", action="store_true", help="also run streaming scenarios")
    p.add_argument("--client", choices=("raw", "httpx", "httpx2"), default="raw",
                   help="load generator HTTP client (default raw; httpx/httpx2 to measure those clients' own cost)")
    p.add_argument("--conversation", choices=("per-worker", "per-request"), default="per-worker",
                   help="X-Conversation-ID per closed-loop worker (a multi-turn chat) or per request")
    p.add_argument("--targets", default="direct,gateway",
                   help="which targets to load (default direct,gateway; 'direct' alone to measure the load generator)")
    p.add_argument("--sim-latency-ms", type=float, default=0.0,
                   help="provider think time in the simulator (default 0: measure pure overhead); "
                        "a realistic value keeps many upstream calls in flight")
    p.add_argument("--sim-jitter-ms", type=float, default=0.0,
                   help="spread the simulator's think time uniformly over latency +/- this (default 0: every answer "
                        "takes exactly --sim-latency-ms, which keeps a closed loop's clients in lockstep waves)")
    p.add_argument("--ramp-s", type=float, default=0.0, metavar="S",
                   help="start the C workers evenly spread over S seconds, at the start of the warm-up (default 0: all at once; "
                        "with a constant provider latency they then stay in lockstep waves, the worst case); "
                        "the provider latency is a natural choice")
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    p.add_argument("--rate-limits", action="store_true",
                   help="give the application and the key request and token limits per minute (never reached), "
                        "so every request is also counted against them")
    p.add_argument("--budgets", action="store_true",
                   help="reserve and settle every request against three budgets and evaluate a ladder")
    p.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the gateway process (repeatable), e.g. GATEWAY_DB_THREADS=16")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="PCT",
                   help="on a shared machine, before each measurement wait until the machine is less than PCT%% busy")
    p.add_argument("--wait-quiet-max", type=float, default=300.0, metavar="S",
                   help="longest wait for --wait-quiet, per measurement (default 300 s)")
    p.add_argument("--asgi-app", default="config.asgi:application",
                   help="ASGI application uvicorn serves (default config.asgi:application); for A/B experiments")
    p.add_argument("--pause-before-load", type=float, default=0.0, metavar="S",
                   help="pause after start-up, before the load (to attach a profiler to the printed pids)")
    p.add_argument("--timeline", default=None, metavar="DIR",
                   help="write each measured request's send time and latency to DIR/<scenario>-<target>.tsv")
    p.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        p.error("--concurrency takes integers, e.g. 1,50")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency levels must be >= 1")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.targets or set(args.targets) - {"direct", "gateway"}:
        p.error("--targets takes direct and/or gateway")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if args.requests is not None and args.requests < 1:
        p.error("--requests must be >= 1")
    host = urlsplit(args.database_url).hostname or "127.0.0.1"
    if args.database_url.startswith("postgres") and not _is_loopback(host):
        p.error("this benchmark only talks to loopback databases")
    return args


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv=None) -> int:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM both end the run through the finally below, which
    # stops the subprocesses (even when started from a shell that ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]

    ensure_database(args.database_url)
    base_env = dict(os.environ, DATABASE_URL=args.database_url, LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    base_env.pop("DJANGO_SETTINGS_MODULE", None)
    migrate(base_env)
    django_setup(args.database_url)
    secret, key_id = seed(run_id, with_budgets=args.budgets, with_rate_limits=args.rate_limits)
    db = database_info()
    info = machine_info(args, db)

    from simulator.testing import start_simulator_process

    sim = gateway = None
    try:
        log(f"starting simulator (--latency-ms {args.sim_latency_ms:g} --jitter-ms {args.sim_jitter_ms:g})")
        sim = start_simulator_process(port=0, latency_ms=args.sim_latency_ms, jitter_ms=args.sim_jitter_ms, seed=1)
        gw_env = dict(base_env, OPENAI_BASE_URL=sim.base_url, OPENAI_API_KEY=SIMULATOR_KEY)
        if args.redis_url:
            gw_env["REDIS_URL"] = args.redis_url
        for item in args.gateway_env:
            name, _, value = item.partition("=")
            gw_env[name] = value
        log(f"starting gateway ({args.server}, {args.workers} worker(s))")
        gateway = Gateway(workers=args.workers, env=gw_env, app=args.asgi_app, server=args.server)
        log(f"gateway pids {gateway.pids()} on {gateway.url}; simulator pid {sim.process.pid} on {sim.origin}")
        if args.pause_before_load:
            time.sleep(args.pause_before_load)
        targets = {
            "direct": Target("direct", "127.0.0.1", sim.port, "/v1/chat/completions", SIMULATOR_KEY),
            "gateway": Target("gateway", "127.0.0.1", gateway.port, "/v1/chat/completions", secret),
        }
        with asyncio.Runner(loop_factory=new_loop) as runner:
            meter = CpuMeter({
                "loadgen": lambda: [os.getpid()],
                "simulator": lambda: [sim.process.pid],
                "gateway": gateway.pids,
                "postgres": (lambda: _pids_named("postgres")) if db["vendor"] == "postgresql" else (lambda: []),
            })
            results, answered = runner.run(run_scenarios(args, targets, run_id, meter))
        if gateway.proc.poll() is not None:
            log(f"gateway exited during the run:\n{gateway.tail()}")
    except KeyboardInterrupt:
        log("interrupted; stopping subprocesses")
        return 130
    finally:
        if gateway is not None:
            gateway.stop()
        if sim is not None:
            sim.stop()

    try:
        by_status = recorded_calls(key_id)
    except Exception as exc:  # report the figures anyway; the check says why it could not run
        by_status = {"unavailable": f"{type(exc).__name__}: {exc}"}
    check = {
        "answered_200": answered,
        "by_status": by_status,
        "consistent": by_status.get("succeeded", 0) == answered and not by_status.get("in_progress")
        and "unavailable" not in by_status,
    }
    info["cpu_calibration_ms_at_end"] = cpu_calibration_ms()
    print_report(info, results, check)
    if args.json_path:
        out = {
            "run_id": run_id,
            "machine": info,
            "config": {
                "concurrency": args.concurrency, "requests": args.requests, "duration_s": args.duration,
                "warmup": args.warmup, "stream": args.stream, "model": args.model, "max_tokens": args.max_tokens,
                "conversation": args.conversation, "gateway_env": args.gateway_env, "targets": args.targets,
                "workers": args.workers, "client": args.client, "sim_latency_ms": args.sim_latency_ms, "sim_jitter_ms": args.sim_jitter_ms, "ramp_s": args.ramp_s,
                "asgi_app": args.asgi_app, "server": args.server, "database_url": args.database_url,
            },
            "results": results,
            "record_check": check,
        }
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(out, indent=2))
        log(f"wrote {args.json_path}")
    errors = sum(r[t]["errors"] for r in results for t in args.targets)
    return 0 if check["consistent"] and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
