#!/usr/bin/env python
"""Chaos run: sustained load through the real gateway while Postgres restarts,
a worker is SIGKILLed and the provider fails in bursts; then the records are
checked against the provider simulator's own log.

    .venv/bin/python benchmarks/chaos.py                   # ~90 s: 60 s of load
    .venv/bin/python benchmarks/chaos.py --duration 30     # shorter
    .venv/bin/python benchmarks/chaos.py --no-restart-postgres   # leave Postgres alone

Everything runs on loopback, bounded in time (``--duration`` of load plus about
30 s of setup and checks):

1. setup (helpers reused from ``benchmarks/gateway_overhead.py``): its own
   database (``--database-url``, default ``governance_chaos``; created if
   missing, migrated with ``manage.py migrate``), the model catalogue, a fresh
   application for this run (primary ``gpt-4o``, fallback route
   ``gpt-4o-mini``, 2 retries, 50 ms backoff, 10 s deadline, 1 s read
   timeout), a lifetime application budget that never refuses, and an API key;
2. the provider simulator with random faults (20 %: 500, 429, reset,
   malformed, cut, hang 3 s) and a JSON-lines log of every request it answered;
3. the gateway: ``uvicorn config.asgi:application --workers 2`` (Redis db 5 for
   the breaker and limits);
4. load: ``--concurrency`` closed-loop clients (httpx), ~30 % streaming, each
   request with its own ``X-Request-ID``, at most ``--max-requests``;
5. chaos on a schedule: at 25 % of the load Postgres is restarted
   (``pg_ctlcluster``; this affects everything else using this Postgres for
   ~2 s), at 50 % one uvicorn worker is SIGKILLed (the supervisor must respawn
   it), at 75 % a burst of 500s is queued in the simulator to trip the circuit
   breaker;
6. afterwards: wait until no call is still finishing, stop the gateway, run the
   reapers (as beat would after the holds' expiry), print what the clients saw
   and the consistency checks (a)-(f). Exit status 1 if any check fails.

Subprocesses are stopped on exit (Ctrl-C and SIGTERM included) and Postgres is
started again if the restart left it down.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(PROJECT_ROOT), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# The overhead benchmark's setup helpers (database, migrate, django setup,
# prompts) are reused as they are; that file is not modified.
from gateway_overhead import (  # noqa: E402
    QUESTIONS,
    SIMULATOR_KEY,
    SYSTEM_PROMPT,
    _is_loopback,
    django_setup,
    ensure_database,
    free_port,
    log,
    migrate,
    percentile,
    stop_process_group,
)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/governance_chaos"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/5"
PRIMARY_MODEL = "gpt-4o"
FALLBACK_MODEL = "gpt-4o-mini"
DEADLINE_S = 10
READ_TIMEOUT_S = 1
SIM_FAULTS = ("500", "429", "reset", "malformed", "cut", "hang")
START_LOADAVG = tuple(round(x, 2) for x in os.getloadavg())


# --- subprocesses ---------------------------------------------------------------


class Gateway:
    """``uvicorn config.asgi:application --workers N`` in its own session; its
    output goes to a file kept for the report."""

    def __init__(self, *, workers: int, env: dict, logdir: Path, startup_timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logdir / "gateway.log"
        self._log = open(self.log_path, "wb")
        cmd = [
            sys.executable, "-m", "uvicorn", "config.asgi:application",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers),
            "--lifespan", "off", "--log-level", "warning", "--no-access-log",
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.workers = workers
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200 and len(self.worker_pids()) >= self.workers:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready within {timeout:g}s:\n{self.tail()}")
            time.sleep(0.1)

    def worker_pids(self) -> list[int]:
        """Children of the uvicorn supervisor that are workers (not
        multiprocessing's resource tracker)."""
        pids = []
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            for child in children:
                with contextlib.suppress(OSError):
                    cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                    if b"resource_tracker" not in cmdline:
                        pids.append(int(child))
        return sorted(pids)

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        stop_process_group(self.proc)
        # workers left behind by a killed supervisor (same session)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def pg_version() -> str:
    versions = sorted(os.listdir("/etc/postgresql"))
    if not versions:
        raise RuntimeError("no cluster under /etc/postgresql")
    return versions[-1]


def pg_ctl(action: str) -> tuple[int, str]:
    proc = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", pg_version(), "main", action],
        capture_output=True, text=True, timeout=120,
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def pg_online() -> bool:
    proc = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[0] == pg_version() and cols[1] == "main":
            return cols[3].startswith("online")
    return False


def ensure_postgres_running() -> None:
    with contextlib.suppress(Exception):
        if pg_online():
            return
        log("Postgres is not running after the chaos run: starting it")
        rc, out = pg_ctl("start")
        log(f"pg_ctlcluster start -> {rc} {out}")


# --- setup ----------------------------------------------------------------------


@dataclasses.dataclass
class Seeded:
    app_id: int
    app_slug: str
    key_id: int
    secret: str
    budget_id: int


def seed(run_id: str) -> Seeded:
    from budgets.catalogue import seed_catalogue
    from budgets.models import Budget
    from governance.models import Application, FallbackRoute
    from governance.services import create_api_key

    seed_catalogue()
    app = Application.objects.create(
        slug=f"chaos-{run_id}", name=f"Chaos run {run_id}", default_model=PRIMARY_MODEL,
        status=Application.Status.PILOT, max_retries=2, retry_backoff_ms=50,
        request_deadline_s=Decimal(DEADLINE_S), read_timeout_s=Decimal(READ_TIMEOUT_S),
        connect_timeout_s=Decimal(1),
    )
    fb = FallbackRoute(application=app, position=1, model=FALLBACK_MODEL)
    fb.full_clean()
    fb.save()
    budget = Budget(
        name=f"chaos {run_id}", scope=Budget.Scope.APPLICATION, application=app,
        period=Budget.Period.NONE, limit_usd=Decimal("100000"), hard_cap=True,
    )
    budget.full_clean()
    budget.save()
    issued = create_api_key(application=app, name=f"chaos run {run_id}")
    others = Budget.objects.filter(scope=Budget.Scope.ORGANISATION, is_active=True).count()
    if others:
        log(f"note: {others} organisation budget(s) in this database also apply to the run")
    return Seeded(app.pk, app.slug, issued.api_key.pk, issued.secret, budget.pk)


def reset_db_pool() -> None:
    """Drop this process's pooled connections (dead after a Postgres restart)."""
    from django.db import connection

    with contextlib.suppress(Exception):
        connection.close()
    if hasattr(connection, "close_pool"):
        with contextlib.suppress(Exception):
            connection.close_pool()


# --- load -----------------------------------------------------------------------


@dataclasses.dataclass
class Rec:
    n: int
    request_id: str
    stream: bool
    t0: float
    t1: float = 0.0
    status: int | None = None  # None: no HTTP response at all
    code: str = ""  # error.code of the body or of the SSE error event
    outcome: str = ""
    reason: str = ""
    end: str = ""  # done | error_event | eof | full_body | bad_body | error_body | broken:<exc> | timeout
    ids: list[str] = dataclasses.field(default_factory=list)  # provider ids seen in the answer
    finish_seen: bool = False  # a stream chunk with a finish_reason: the whole answer text arrived

    @property
    def answered(self) -> bool:
        return self.status == 200 and self.end in ("done", "full_body")


def _body(n: int, stream: bool, max_tokens: int) -> dict:
    body = {
        "model": PRIMARY_MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{QUESTIONS[n % len(QUESTIONS)]} (ticket {n})"},
        ],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
    return body


def _error_code(raw: bytes) -> str:
    try:
        return str((json.loads(raw).get("error") or {}).get("code") or "")
    except (ValueError, AttributeError):
        return "unparseable_body"


async def one_request(client, rec: Rec, body: dict, headers: dict, t_base: float) -> None:
    import httpx

    try:
        if rec.stream:
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
                rec.status = resp.status_code
                rec.outcome = resp.headers.get("x-governance-outcome", "")
                rec.reason = resp.headers.get("x-governance-reason", "")
                if resp.status_code != 200 or "text/event-stream" not in resp.headers.get("content-type", ""):
                    raw = await resp.aread()
                    rec.code = _error_code(raw) if resp.status_code != 200 else ""
                    rec.end = "error_body" if resp.status_code != 200 else "bad_body"
                else:
                    rec.end = "eof"
                    async for line in resp.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            rec.end = "done"
                            continue
                        try:
                            event = json.loads(data)
                        except ValueError:
                            rec.end = "bad_event"
                            continue
                        if "error" in event:
                            rec.end = "error_event"
                            rec.code = str((event.get("error") or {}).get("code") or "")
                        else:
                            if event.get("id") and (not rec.ids or rec.ids[-1] != event["id"]):
                                rec.ids.append(event["id"])
                            if any(c.get("finish_reason") for c in event.get("choices") or ()):
                                rec.finish_seen = True
        else:
            resp = await client.post("/v1/chat/completions", json=body, headers=headers)
            rec.status = resp.status_code
            rec.outcome = resp.headers.get("x-governance-outcome", "")
            rec.reason = resp.headers.get("x-governance-reason", "")
            if resp.status_code == 200:
                try:
                    payload = resp.json()
                    ok = isinstance(payload.get("choices"), list) and payload["choices"]
                except ValueError:
                    payload, ok = {}, False
                rec.end = "full_body" if ok else "bad_body"
                if payload.get("id"):
                    rec.ids.append(payload["id"])
            else:
                rec.end = "error_body"
                rec.code = _error_code(resp.content)
    except httpx.TimeoutException:
        rec.end = "timeout"
    except httpx.HTTPError as exc:
        rec.end = f"broken:{type(exc).__name__}"
    finally:
        rec.t1 = time.perf_counter() - t_base


@dataclasses.dataclass
class Event:
    t: float
    what: str


class Chaos:
    """The scheduled faults and what was observed about them."""

    def __init__(self, *, gateway: Gateway, sim, args, t_base: float):
        self.gateway = gateway
        self.sim = sim
        self.args = args
        self.t_base = t_base
        self.events: list[Event] = []
        self.failures: list[str] = []  # chaos steps that did not behave (reported, exit non-zero)
        self.breaker_samples: list[tuple[float, dict[str, str]]] = []
        self.sim_requests: list[tuple[float, int]] = []  # (t, simulator chat requests so far)

    def note(self, what: str) -> None:
        t = time.perf_counter() - self.t_base
        self.events.append(Event(t, what))
        log(f"  [t={t:5.1f}s] {what}")

    async def at(self, fraction: float) -> None:
        await asyncio.sleep(max(0.0, self.t_base + fraction * self.args.duration - time.perf_counter()))

    async def run(self) -> None:
        args = self.args
        await self.at(0.25)
        if args.restart_postgres:
            log("WARNING: restarting the shared Postgres cluster now; anything else using it "
                "(other engineers' tests included) loses its connections for ~2 s")
            self.note("restarting Postgres (pg_ctlcluster restart)")
            t = time.perf_counter()
            rc, out = await asyncio.to_thread(pg_ctl, "restart")
            self.note(f"Postgres restart finished: exit {rc} in {time.perf_counter() - t:.1f}s {out}".rstrip())
            if rc != 0:
                self.failures.append(f"pg_ctlcluster restart exited {rc}: {out}")
        else:
            self.note("Postgres restart skipped (--no-restart-postgres)")
        await self.at(0.50)
        if args.kill_worker:
            await self.kill_worker()
        else:
            self.note("worker kill skipped (--no-kill-worker)")
        await self.at(0.75)
        burst, why = self.burst_size()
        try:
            await asyncio.to_thread(self.sim.set_faults, ["500"] * burst)
            self.note(f"queued {burst} x '500' in the simulator (POST /_sim/faults){why}")
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            self.failures.append(f"could not queue faults: {exc!r}")

    def burst_size(self) -> tuple[int, str]:
        """``--burst N``, or (auto) enough 500s to take the breaker's window
        past its failure ratio: the breaker counts the last 20-30 s of calls,
        so a fixed 30 is lost in the traffic of a busy gateway."""
        if self.args.burst:
            return self.args.burst, ""
        now = time.perf_counter() - self.t_base
        window = [(t, n) for t, n in self.sim_requests if t >= now - 20]
        if len(window) < 2:
            return 30, " (auto: no rate measured, 30)"
        (t0, n0), (t1, n1) = window[0], window[-1]
        rate = (n1 - n0) / max(t1 - t0, 1e-3)
        size = max(30, int(math.ceil(1.5 * rate * 20)))
        return size, f" (auto: 1.5 x 20 s of upstream requests at the measured {rate:.0f}/s)"

    async def kill_worker(self) -> None:
        before = self.gateway.worker_pids()
        if not before:
            self.failures.append("no uvicorn worker found to kill")
            self.note("no uvicorn worker found to kill")
            return
        victim = random.Random(self.args.seed).choice(before)
        os.kill(victim, signal.SIGKILL)
        self.note(f"SIGKILL uvicorn worker {victim} (workers were {before})")
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.2)
            now = self.gateway.worker_pids()
            fresh = [p for p in now if p not in before]
            if fresh and len(now) >= len(before):
                self.note(f"supervisor respawned a worker: {fresh[0]} (workers now {now})")
                return
        msg = f"the supervisor did not respawn the killed worker within 30 s (workers now {self.gateway.worker_pids()})"
        self.failures.append(msg)
        self.note(msg)

    async def sample_breakers(self, stop: asyncio.Event) -> None:
        """Once a second: the state of this run's breakers (Redis, shared by all workers)."""
        from conversations.gateway import breaker

        prefix = self.sim.base_url.rstrip("/")
        last: dict[str, str] = {}
        while not stop.is_set():
            try:
                states = await asyncio.to_thread(breaker.states)
                now = {s.key.split("|", 1)[1]: s.state for s in states if s.key.startswith(prefix)}
            except Exception as exc:  # noqa: BLE001
                now = {"?": f"unreadable ({type(exc).__name__})"}
            t = time.perf_counter() - self.t_base
            self.breaker_samples.append((t, now))
            with contextlib.suppress(Exception):
                stats = await asyncio.to_thread(self.sim.stats)
                self.sim_requests.append((time.perf_counter() - self.t_base, int(stats["requests"])))
            for model in sorted(set(now) | set(last)):
                if now.get(model, "closed") != last.get(model, "closed"):
                    self.note(f"breaker {model}: {last.get(model, 'closed')} -> {now.get(model, 'closed')}")
            last = now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def run_load(args, gateway: Gateway, sim, secret: str, run_id: str) -> tuple[list[Rec], Chaos, float]:
    import httpx

    rng = random.Random(args.seed)
    recs: list[Rec] = []
    counter = iter(range(args.max_requests))
    t_base = time.perf_counter()
    end = t_base + args.duration
    chaos = Chaos(gateway=gateway, sim=sim, args=args, t_base=t_base)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=httpx.Timeout(args.timeout), limits=limits) as client:

        async def worker(w: int) -> None:
            for n in counter:
                if time.perf_counter() >= end:
                    return
                stream = rng.random() < args.stream_ratio
                rec = Rec(n=n, request_id=f"chaos-{run_id}-{n:06d}", stream=stream, t0=time.perf_counter() - t_base)
                recs.append(rec)
                headers = {
                    "Authorization": f"Bearer {secret}",
                    "X-Request-ID": rec.request_id,
                    "X-Conversation-ID": f"chaos-{run_id}-w{w}",
                    "X-Step": "answer",
                }
                await one_request(client, rec, _body(n, stream, args.max_tokens), headers, t_base)

        stop = asyncio.Event()
        sampler = asyncio.create_task(chaos.sample_breakers(stop))
        schedule = asyncio.create_task(chaos.run())
        chaos.note(f"load starts: {args.concurrency} clients, {args.stream_ratio:.0%} streaming, {args.duration:g}s")
        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        chaos.note(f"load ends: {len(recs)} requests sent")
        if not schedule.done():  # a very short --duration: let the schedule finish
            await schedule
        schedule.result()
        stop.set()
        await sampler
    return recs, chaos, t_base


# --- after the load ---------------------------------------------------------------


def wait_settled(app_id: int, max_wait_s: float = 30.0) -> int:
    """Wait until the number of in-progress calls stops changing (nothing is
    still being finished); returns that number."""
    from conversations.models import ProviderCall

    deadline = time.monotonic() + max_wait_s
    last, stable_since = None, time.monotonic()
    while True:
        try:
            n = ProviderCall.objects.filter(application_id=app_id, status="in_progress").count()
        except Exception:  # noqa: BLE001 - pool still holds pre-restart connections
            reset_db_pool()
            time.sleep(0.5)
            continue
        if n != last:
            last, stable_since = n, time.monotonic()
        if n == 0 or time.monotonic() - stable_since >= 3 or time.monotonic() > deadline:
            return n
        time.sleep(0.5)


def run_reapers(app_id: int) -> dict:
    from django.conf import settings
    from django.utils import timezone

    from budgets.services import expire_stale_reservations
    from conversations.services import mark_interrupted_calls

    ttl = max(settings.GATEWAY["RESERVATION_TTL_S"], DEADLINE_S + 30)
    expired = expire_stale_reservations(now=timezone.now() + timedelta(seconds=ttl + 1))
    closed = mark_interrupted_calls(older_than_s=DEADLINE_S + 30)
    return {"reservation_ttl_s": ttl, "holds_expired": expired, "calls_closed_without_hold": closed}


def read_sim_log(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    anonymous = 0
    with open(path, "rb") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            entry = json.loads(line)
            if entry.get("id"):
                out[entry["id"]] = entry
            else:
                anonymous += 1
    out["__anonymous__"] = {"count": anonymous}
    return out


def check(recs: list[Rec], sim_log: dict[str, dict], seeded: Seeded) -> tuple[list[tuple[str, bool | None, str]], dict]:
    from django.db.models import Count

    from budgets.models import BudgetPeriod, Reservation
    from budgets.selectors import cost_of
    from conversations.models import ProviderCall

    calls = list(
        ProviderCall.objects.filter(application_id=seeded.app_id).values(
            "id", "request_id", "status", "outcome", "provider_response_id", "attempts", "decisions",
            "cost_usd", "prompt_tokens", "completion_tokens", "cached_tokens", "stream", "error_code",
            "http_status", "model_used", "usage_source",
        )
    )
    by_request = collections.defaultdict(list)
    by_response = collections.defaultdict(list)
    for c in calls:
        by_request[c["request_id"]].append(c)
        if c["provider_response_id"]:
            by_response[c["provider_response_id"]].append(c)
    results: list[tuple[str, bool | None, str]] = []
    info: dict = {"calls_by_status": dict(collections.Counter(c["status"] for c in calls))}

    # (a) every complete simulator answer the client received is recorded exactly once, succeeded
    sim_done = {i: e for i, e in sim_log.items() if i != "__anonymous__" and e.get("status") == 200 and e.get("completed")}
    received_full = {i for r in recs if r.answered for i in r.ids}
    received_partial = {i for r in recs if not r.answered for i in r.ids} - received_full
    bad = []
    for rid in sorted(received_full & set(sim_done)):
        rows = by_response.get(rid, [])
        if len(rows) != 1 or rows[0]["status"] != "succeeded":
            bad.append((rid, [(r["request_id"], r["status"]) for r in rows]))
    not_in_sim = sorted(received_full - set(sim_done))
    # the other direction: a succeeded call names a completed simulator answer, once
    dup = {rid: len(rows) for rid, rows in by_response.items() if len(rows) > 1}
    succeeded_unknown = [c["request_id"] for c in calls if c["status"] == "succeeded" and c["provider_response_id"] not in sim_done]
    ok = not bad and not not_in_sim and not dup and not succeeded_unknown
    detail = (
        f"{len(received_full & set(sim_done))} complete answers received, each matched to one succeeded call"
        if ok else
        f"mismatched {len(bad)} (e.g. {bad[:3]}), received ids unknown to the simulator {len(not_in_sim)} "
        f"(e.g. {not_in_sim[:3]}), provider ids recorded twice {len(dup)}, succeeded calls without a completed "
        f"simulator answer {len(succeeded_unknown)} (e.g. {succeeded_unknown[:3]})"
    )
    results.append(("(a) client-received simulator answers <-> one succeeded ProviderCall each", ok, detail))
    # partially received streams (the client saw chunks, not [DONE]): what became of them
    partial_states = collections.Counter()
    for rid in received_partial:
        rows = by_response.get(rid, [])
        sim_state = "sim completed" if rid in sim_done else "sim incomplete"
        partial_states[(sim_state, rows[0]["status"] if rows else "no call with this provider id")] += 1
    info["partial_streams"] = {f"{k[0]}, call {k[1]}": v for k, v in sorted(partial_states.items())}
    examples = []
    for r in recs:
        if not r.answered and r.ids and r.ids[0] in sim_done and not by_response.get(r.ids[0]):
            rows = by_request.get(r.request_id, [])
            text = "whole answer text received" if r.finish_seen else "part of the answer received"
            examples.append(f"{r.request_id} (client: {text}, then {r.code or r.end}; "
                            f"call {rows[0]['status'] if rows else 'none'})")
    info["partial_examples"] = examples
    # the provider did the whole job but no call says so (not billed)
    unbilled = [i for i in sim_done if not any(c["status"] == "succeeded" for c in by_response.get(i, []))]
    info["sim_completed_not_recorded_as_succeeded"] = len(unbilled)
    from budgets.selectors import priced_model

    unbilled_usd = Decimal(0)
    for i in unbilled:
        e = sim_done[i]
        unbilled_usd += cost_of(price=priced_model(name=e["model"]).price, prompt_tokens=e["prompt_tokens"],
                                completion_tokens=e["completion_tokens"], cached_tokens=e["cached_tokens"] or 0)
    info["unbilled_usd"] = unbilled_usd
    info["sim_completed_total"] = len(sim_done)

    # (b) no call left in progress after the reapers
    in_progress = [c["request_id"] for c in calls if c["status"] == "in_progress"]
    results.append(("(b) no ProviderCall left in_progress after the reapers", not in_progress,
                    f"{len(in_progress)} in progress" + (f" (e.g. {in_progress[:3]})" if in_progress else "")))

    # (c) no hold left
    reservations = Reservation.objects.filter(call__application_id=seeded.app_id)
    res_by_status = dict(reservations.values_list("status").annotate(n=Count("id")).values_list("status", "n"))
    info["reservations_by_status"] = res_by_status
    period = BudgetPeriod.objects.filter(budget_id=seeded.budget_id).first()
    held = res_by_status.get("held", 0)
    reserved_left = (period.reserved_usd, period.reserved_tokens) if period else (Decimal(0), 0)
    results.append(("(c) no Reservation left held, nothing left reserved on the period",
                    held == 0 and reserved_left[0] == 0 and reserved_left[1] == 0,
                    f"held {held}, period reserved_usd {reserved_left[0]} reserved_tokens {reserved_left[1]}"))

    # (d) spend = sum of settled holds = sum of those calls' costs; each call charged once, for one answer
    settled = list(reservations.filter(status="settled").values("call_id", "settled_usd", "settled_tokens"))
    settled_sum = sum((r["settled_usd"] for r in settled), Decimal(0))
    per_call = collections.Counter(r["call_id"] for r in settled)
    twice = [cid for cid, n in per_call.items() if n > 1]
    holds_per_call = collections.Counter(reservations.values_list("call_id", flat=True))
    multi_holds = [cid for cid, n in holds_per_call.items() if n > 1]
    call_cost = {c["id"]: c["cost_usd"] for c in calls}
    cost_sum = sum((call_cost.get(r["call_id"]) or Decimal(0) for r in settled), Decimal(0))
    mismatch_settle = [r["call_id"] for r in settled if r["settled_usd"] != call_cost.get(r["call_id"])]
    spent = period.spent_usd if period else Decimal(0)
    # the tokens charged are one simulator answer's (not the sum over retries)
    from budgets.models import ModelPrice

    prices = {p.pk: p for p in ModelPrice.objects.all()}
    token_mismatch = []
    cost_recomputed_mismatch = []
    price_of = dict(ProviderCall.objects.filter(application_id=seeded.app_id).values_list("id", "price_id"))
    for c in calls:
        if c["status"] != "succeeded":
            continue
        entry = sim_done.get(c["provider_response_id"])
        if entry is None:
            continue
        if (c["prompt_tokens"], c["completion_tokens"]) != (entry["prompt_tokens"], entry["completion_tokens"]):
            token_mismatch.append(c["request_id"])
        price = prices.get(price_of.get(c["id"]))
        if price is not None and c["usage_source"] == "provider":
            expected = cost_of(price=price, prompt_tokens=entry["prompt_tokens"],
                               completion_tokens=entry["completion_tokens"], cached_tokens=entry["cached_tokens"] or 0)
            if expected != c["cost_usd"]:
                cost_recomputed_mismatch.append(c["request_id"])
    ok = (spent == settled_sum == cost_sum and not twice and not multi_holds and not mismatch_settle
          and not token_mismatch and not cost_recomputed_mismatch)
    results.append((
        "(d) spent = sum of settled holds = sum of those calls' cost_usd; one charge per call",
        ok,
        f"period spent_usd {spent}, settled holds {len(settled)} summing {settled_sum}, their calls' cost_usd "
        f"{cost_sum}; calls settled twice {len(twice)}, calls with >1 hold {len(multi_holds)}, "
        f"hold != call cost {len(mismatch_settle)}, tokens != the one simulator answer {len(token_mismatch)}, "
        f"cost != price x simulator usage {len(cost_recomputed_mismatch)}",
    ))

    # (e) every answered client request has its call, under its X-Request-ID
    missing, wrong = [], []
    for r in recs:
        if not r.answered:
            continue
        rows = by_request.get(r.request_id, [])
        if not rows:
            missing.append(r.request_id)
        elif not any(c["status"] == "succeeded" and c["provider_response_id"] in r.ids for c in rows):
            wrong.append((r.request_id, [(c["status"], c["provider_response_id"]) for c in rows]))
    answered = sum(1 for r in recs if r.answered)
    results.append(("(e) every 200 answer has a succeeded ProviderCall with its X-Request-ID",
                    not missing and not wrong,
                    f"{answered} answered; without a call {len(missing)} (e.g. {missing[:3]}), "
                    f"call not succeeded with the id the client got {len(wrong)} (e.g. {wrong[:2]})"))

    # (f) retries and fallbacks happened (the chaos exercised them)
    retried = [c for c in calls if len(c["attempts"] or []) > 1]
    fallback = [c for c in calls if any(d.get("kind") == "fallback_used" for d in (c["decisions"] or []))]
    retried_ok = sum(1 for c in retried if c["status"] == "succeeded")
    attempts_total = sum(len(c["attempts"] or []) for c in calls)
    attempt_outcomes = collections.Counter(a.get("outcome") for c in calls for a in (c["attempts"] or []))
    info["attempt_outcomes"] = dict(attempt_outcomes.most_common())
    results.append(("(f) retries and fallbacks exercised (count)", None,
                    f"calls with >1 attempt: {len(retried)} ({retried_ok} of them succeeded); "
                    f"with fallback_used: {len(fallback)} "
                    f"({sum(1 for c in fallback if c['status'] == 'succeeded')} succeeded); "
                    f"attempts recorded: {attempts_total} for {len(calls)} calls"))
    info["spent_usd"] = spent
    return results, info


# --- report -----------------------------------------------------------------------


def summarise_gateway_log(text: str) -> str:
    """Counts of the gateway's structured log events (and tracebacks) by name."""
    import re

    events = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\d{4}-\S+ \[(\w+)\s*\] (.*)$", line)
        if not m:
            continue
        level, rest = m.groups()
        event = re.split(r"\s{2,}|\s\[", rest.strip())[0].split(":")[0][:48]
        logger = re.search(r"\[([\w.]+)\]", rest)
        if logger and logger.group(1) == "django.request":
            event = "django.request " + event
        events[f"{level} {event}"] += 1
    events["tracebacks"] = text.count("Traceback (most recent call last)")
    return f"{len(text.splitlines())} lines; " + counter_line(events)



def counter_line(counter: collections.Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))) or "—"


def print_timeline(recs: list[Rec], duration: float, step: float) -> None:
    buckets = int(math.ceil(duration / step)) + 1
    rows = [collections.Counter() for _ in range(buckets + 4)]
    for r in recs:
        i = min(int(r.t0 // step), len(rows) - 1)
        rows[i]["sent"] += 1
        if r.answered:
            rows[i]["answered"] += 1
        elif r.status is None:
            rows[i]["no_response"] += 1
        else:
            rows[i][r.code or r.end] += 1
    print(f"timeline (by request start, {step:g} s buckets): answered / sent, then what the rest got")
    for i, row in enumerate(rows):
        if not row:
            continue
        rest = {k: v for k, v in row.items() if k not in ("sent", "answered")}
        print(f"  {i * step:5.0f}-{(i + 1) * step:<4.0f}s {row['answered']:>5} / {row['sent']:<5} "
              + ", ".join(f"{k} {v}" for k, v in sorted(rest.items(), key=lambda kv: -kv[1])))


def report(args, recs, chaos, sim_stats, reaped, settled_in_progress, checks, info, gateway_log: str, wall: float) -> None:
    print()
    print(f"== chaos run: {args.duration:g} s of load, {args.concurrency} clients, "
          f"{args.stream_ratio:.0%} streaming, 2 uvicorn workers, simulator fail-rate 0.2 "
          f"({','.join(SIM_FAULTS)}; hang 3 s), app read timeout {READ_TIMEOUT_S} s, deadline {DEADLINE_S} s, "
          f"2 retries, fallback {PRIMARY_MODEL} -> {FALLBACK_MODEL}")
    print(f"machine: {os.cpu_count()} cores, load average at start {START_LOADAVG}")
    print()
    print("events:")
    for e in chaos.events:
        print(f"  t={e.t:5.1f}s  {e.what}")
    print()
    sent = len(recs)
    answered = sum(1 for r in recs if r.answered)
    print(f"requests sent: {sent} ({sum(r.stream for r in recs)} streaming) in {wall:.1f} s; "
          f"answered (200 with [DONE] or a full body): {answered} ({100 * answered / max(sent, 1):.1f} %)")
    print(f"by HTTP status: {counter_line(collections.Counter(str(r.status) if r.status else 'no response' for r in recs))}")
    print(f"by error code: {counter_line(collections.Counter(r.code for r in recs if r.code))}")
    outcomes = collections.Counter(f"{r.outcome or '-'}/{r.reason or '-'}" for r in recs)
    print(f"by outcome/reason: {counter_line(outcomes)}")
    print(f"streams ended with: {counter_line(collections.Counter(r.end for r in recs if r.stream and r.status == 200))}")
    print(f"non-streaming 200s: {counter_line(collections.Counter(r.end for r in recs if not r.stream and r.status == 200))}")
    for label, subset in (("non-streaming", [r for r in recs if r.answered and not r.stream]),
                          ("streaming", [r for r in recs if r.answered and r.stream])):
        lat = sorted((r.t1 - r.t0) * 1000 for r in subset)
        if lat:
            print(f"latency of answered {label} requests (client side, ms): p50 {percentile(lat, 50):.0f}, "
                  f"p95 {percentile(lat, 95):.0f}, p99 {percentile(lat, 99):.0f}, max {lat[-1]:.0f}")
    broken = collections.Counter(r.end for r in recs if r.status is None)
    print(f"no HTTP response (connection broke / timeout): {counter_line(broken)}")
    print()
    print_timeline(recs, args.duration, args.timeline_step)
    print()
    print(f"simulator: {sim_stats.get('requests')} chat requests, by fault {sim_stats.get('by_fault')}, "
          f"by status {sim_stats.get('by_status')}, completed {sim_stats.get('completed')}")
    opened = sorted({m for _, s in chaos.breaker_samples for m, st in s.items() if st != "closed"})
    print(f"circuit breakers seen open or half-open: {opened or 'none'}")
    print(f"gateway log: {gateway_log}")
    print(f"after the load: {settled_in_progress} call(s) still in progress once nothing changed; reapers "
          f"(expire_stale_reservations at now + {reaped['reservation_ttl_s']:g} s + 1 s, then "
          f"mark_interrupted_calls older than {DEADLINE_S + 30} s, both database-wide): {reaped['holds_expired']} "
          f"hold(s) expired ({info['reservations_by_status'].get('expired', 0)} of them this run's), "
          f"{reaped['calls_closed_without_hold']} call(s) closed without a hold")
    print(f"ProviderCall rows by status: {info['calls_by_status']}")
    print(f"Reservations by status: {info['reservations_by_status']}")
    print(f"attempt outcomes: {info['attempt_outcomes']}")
    print(f"streams the client saw only in part: {info['partial_streams'] or 'none'}")
    if info["partial_examples"]:
        print("  of which the provider had sent the whole answer but no call records it: "
              + "; ".join(info["partial_examples"]))
    print(f"simulator answers completed: {info['sim_completed_total']}, of which not recorded as a succeeded "
          f"call: {info['sim_completed_not_recorded_as_succeeded']}, worth ${info['unbilled_usd']:.6f} at list price "
          f"(provider work the budget never charged: the worker died or the record could not be written; "
          f"none reached a client as 200 + [DONE] or a full body)")
    print()
    print("consistency checks:")
    failed = False
    for name, ok, detail in checks:
        verdict = "INFO" if ok is None else ("PASS" if ok else "FAIL")
        failed |= ok is False
        print(f"  {verdict}  {name}: {detail}")
    for problem in chaos.failures:
        print(f"  FAIL  chaos step: {problem}")
    print()
    print("RESULT: " + ("FAIL" if failed or chaos.failures else "PASS"))


# --- main -------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--stream-ratio", type=float, default=0.3, help="share of streaming requests (default 0.3)")
    p.add_argument("--max-requests", type=int, default=30000, help="upper bound on requests sent (default 30000)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (default 30 s)")
    p.add_argument("--burst", type=int, default=0,
                   help="500s queued in the simulator at 75%% (default 0: auto, enough to trip the breaker "
                        "at the measured request rate; 30 is lost in the traffic)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--no-restart-postgres", dest="restart_postgres", action="store_false",
                   help="do not restart Postgres at 25%% (it is shared with everything else on this machine)")
    p.add_argument("--no-kill-worker", dest="kill_worker", action="store_false")
    p.add_argument("--timeline-step", type=float, default=5.0, help=argparse.SUPPRESS)
    p.add_argument("--keep-logs", action="store_true", help="keep the simulator and gateway logs (path printed)")
    args = p.parse_args(argv)
    if not args.database_url.startswith("postgres"):
        p.error("the chaos run needs Postgres (it restarts it)")
    for url in (args.database_url, args.redis_url):
        if not _is_loopback(urlsplit(url).hostname or "127.0.0.1"):
            p.error(f"loopback only: {url}")
    if args.duration <= 0 or args.concurrency < 1 or args.max_requests < 1:
        p.error("--duration, --concurrency and --max-requests must be positive")
    return args


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:4]
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
    sim_log_path = workdir / "sim.jsonl"

    ensure_database(args.database_url)
    base_env = dict(os.environ, DATABASE_URL=args.database_url, REDIS_URL=args.redis_url,
                    LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    base_env.pop("DJANGO_SETTINGS_MODULE", None)
    migrate(base_env)
    os.environ["REDIS_URL"] = args.redis_url  # this process reads the breakers from the same Redis
    django_setup(args.database_url)
    seeded = seed(run_id)
    log(f"run {run_id}: application {seeded.app_slug}, budget {seeded.budget_id}, key {seeded.key_id}; logs in {workdir}")
    reset_db_pool()

    from simulator.testing import start_simulator_process

    sim = gateway = None
    code = 1
    try:
        log("starting simulator")
        sim = start_simulator_process(
            port=0, seed=args.seed, log_file=str(sim_log_path), fail_rate=0.2, faults=list(SIM_FAULTS),
            hang_s=3, retry_after=0, latency_ms=20, jitter_ms=10,
        )
        gw_env = dict(base_env, OPENAI_BASE_URL=sim.base_url, OPENAI_API_KEY=SIMULATOR_KEY)
        log("starting gateway (uvicorn, 2 workers)")
        gateway = Gateway(workers=2, env=gw_env, logdir=workdir)
        log(f"gateway on {gateway.url}: supervisor {gateway.proc.pid}, workers {gateway.worker_pids()}; "
            f"simulator pid {sim.process.pid} on {sim.origin}")
        log(f"load for {args.duration:g} s")
        recs, chaos, t_base = asyncio.run(run_load(args, gateway, sim, seeded.secret, run_id))
        wall = time.perf_counter() - t_base
        sim_stats = sim.stats()
        if gateway.proc.poll() is not None:
            chaos.failures.append(f"the uvicorn supervisor exited during the run ({gateway.proc.returncode})")
        ensure_postgres_running()
        reset_db_pool()
        log("waiting for in-flight calls to settle")
        still = wait_settled(seeded.app_id)
        gateway.stop()
        sim.stop()
        reset_db_pool()
        log("running the reapers")
        reaped = run_reapers(seeded.app_id)
        checks, info = check(recs, read_sim_log(sim_log_path), seeded)
        glog = gateway.log_path.read_text(errors="replace")
        gateway_log = summarise_gateway_log(glog) + (f" ({gateway.log_path})" if args.keep_logs else "")
        if args.keep_logs:
            with open(workdir / "client.jsonl", "w") as fh:
                for r in recs:
                    fh.write(json.dumps(dataclasses.asdict(r)) + "\n")
        report(args, recs, chaos, sim_stats, reaped, still, checks, info, gateway_log, wall)
        failed = any(ok is False for _, ok, _ in checks) or chaos.failures
        code = 1 if failed else 0
        print(f"total time {time.perf_counter() - started:.0f} s")
    except KeyboardInterrupt:
        log("interrupted; stopping subprocesses")
        code = 130
    finally:
        if gateway is not None:
            gateway.stop()
        if sim is not None:
            sim.stop()
        ensure_postgres_running()
        if not args.keep_logs:
            for f in workdir.iterdir():
                with contextlib.suppress(OSError):
                    f.unlink()
            with contextlib.suppress(OSError):
                workdir.rmdir()
    return code


if __name__ == "__main__":
    sys.exit(main())
