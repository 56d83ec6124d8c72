"""Serve the platform with N uvicorn worker processes, each accepting on a
listening socket of its own (SO_REUSEPORT), under a small supervisor.

    python -m config.serve --host 0.0.0.0 --port 8000 --workers 2

Why not `uvicorn --workers N`: its workers share one listening socket and
whichever is awake first accepts. A bot's HTTP client, or a load balancer,
keeps a pool of long-lived keep-alive connections, so they pile onto a few
workers: in the load benchmark one of two workers held 70 % of 200
connections, and its queue made most of the streaming p99. With a socket per
worker the kernel assigns each new connection to a worker by a hash of its
addresses, so they spread evenly whatever the workers are doing.

The supervisor starts the workers, starts a worker again when one dies (after
a growing pause if it keeps dying at start-up, giving up after five such
deaths in a row), and on SIGTERM or SIGINT asks them to finish their requests
(uvicorn's graceful shutdown) and kills what is left after --graceful-timeout.
Linux only (SO_REUSEPORT with load balancing).

Metrics: the workers write their Prometheus metrics to files in
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode; a fresh
temporary directory unless one is given, emptied at start), so /metrics
answers for all workers together whichever one serves the scrape, and the
counts of a worker that died stay in the totals.
"""

import argparse
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from multiprocessing.connection import wait

log = logging.getLogger("serve")

QUICK_DEATH_S = 5.0  # a worker that dies sooner than this after starting counts as failing to start
MAX_QUICK_DEATHS = 5


def listening_socket(host: str, port: int, *, listen: bool = True, backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(backlog)
    return sock


def _already_served(host: str, port: int) -> bool:
    """Another server answers on this address. SO_REUSEPORT would let a
    second instance (same user) join the first one's port silently."""
    try:
        with socket.create_connection((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _exit_with_the_supervisor(supervisor_pid: int) -> None:
    """SIGTERM this worker when the supervisor dies, even by SIGKILL, so no
    orphan keeps accepting on the port (Linux's PR_SET_PDEATHSIG)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        log.warning("worker cannot follow the supervisor's death (prctl errno %s)", ctypes.get_errno())
    if os.getppid() != supervisor_pid:  # died before prctl took effect
        sys.exit(0)


def _worker(options: dict) -> None:
    import uvicorn

    _exit_with_the_supervisor(options["supervisor_pid"])
    config = uvicorn.Config(
        options["app"],
        loop=options["loop"],
        http=options["http"],
        lifespan=options["lifespan"],
        log_level=options["log_level"],
        access_log=False,
        timeout_graceful_shutdown=options["graceful_timeout"],
    )
    # The application (Django, the token encoder) is imported before this
    # worker joins the port: from the moment its socket listens, the kernel
    # hands it a share of new connections, which would wait out the seconds
    # of start-up of a replacement worker.
    config.load()
    sock = listening_socket(options["host"], options["port"], backlog=options["backlog"])
    uvicorn.Server(config).run(sockets=[sock])


class Supervisor:
    def __init__(self, options: dict, workers: int):
        self.options = options
        self.count = workers
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self.started_at: dict[int, float] = {}
        self.quick_deaths: dict[int, int] = {}
        self.stopping = False

    def _start(self, slot: int) -> None:
        proc = self.ctx.Process(target=_worker, args=(self.options,), name=f"web-{slot}", daemon=False)
        proc.start()
        self.procs[slot], self.started_at[slot] = proc, time.monotonic()
        log.info("worker %s started (pid %s)", slot, proc.pid)

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for slot in range(self.count):
            self._start(slot)
        host, port = self.options["host"], self.options["port"]
        log.info("serving http://%s:%s with %s workers (pids %s)", host, port, self.count,
                 " ".join(str(p.pid) for p in self.procs.values()))
        code = 0
        while not self.stopping:
            wait([p.sentinel for p in self.procs.values()], timeout=0.5)
            for slot, proc in list(self.procs.items()):
                if proc.is_alive() or self.stopping:
                    continue
                lived = time.monotonic() - self.started_at[slot]
                self.quick_deaths[slot] = self.quick_deaths.get(slot, 0) + 1 if lived < QUICK_DEATH_S else 0
                log.warning("worker %s (pid %s) exited with %s after %.1f s", slot, proc.pid, proc.exitcode, lived)
                _metrics_of_dead_worker(proc.pid)
                if self.quick_deaths[slot] >= MAX_QUICK_DEATHS:
                    log.error("worker %s died %s times in a row at start-up; stopping (see its log above)",
                              slot, MAX_QUICK_DEATHS)
                    self.stopping, code = True, 1
                    break
                time.sleep(min(0.1 * 2 ** self.quick_deaths[slot], 5.0))
                self._start(slot)
        self._stop_all()
        return code

    def _stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        deadline = time.monotonic() + self.options["graceful_timeout"] + 5
        for proc in self.procs.values():
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker pid %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join(timeout=5)
        log.info("stopped")


def _shared_metrics_dir() -> tuple[str, bool]:
    """The workers' metrics directory, emptied (files of an earlier run
    would be added to this one's counts); True if it was created here."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not given:
        path = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path  # inherited by the workers
        return path, True
    Path(given).mkdir(parents=True, exist_ok=True)
    for stale in Path(given).glob("*.db"):
        stale.unlink()
    return given, False


def _metrics_of_dead_worker(pid: int) -> None:
    """Counters and histograms keep a dead worker's counts; gauges of the
    live kinds drop them."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m config.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--app", default="config.asgi:application")
    p.add_argument("--loop", default="uvloop", choices=("auto", "asyncio", "uvloop"))
    p.add_argument("--http", default="httptools", choices=("auto", "h11", "httptools"))
    p.add_argument("--lifespan", default="on", choices=("auto", "on", "off"),
                   help="on (default): shutdown closes provider pools and database connections")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--backlog", type=int, default=2048, help="each worker's accept queue")
    p.add_argument("--graceful-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, how long requests in flight may take to finish (default 30)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if not 0 < args.port < 65536:
        p.error("--port must be between 1 and 65535 (each worker binds it, so it cannot be 0)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve %(levelname)s %(message)s", stream=sys.stderr)
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        # Elsewhere SO_REUSEPORT either does not exist or does not spread
        # connections (BSD and macOS hand them all to one socket).
        log.error("config.serve needs Linux's SO_REUSEPORT; on %s run uvicorn --workers instead", sys.platform)
        return 2
    if _already_served(args.host, args.port):
        log.error("something already answers on %s:%s; refusing to share its port", args.host, args.port)
        return 2
    try:
        # Bound, never listening: fails now, with a clear message, if the port
        # is taken by a process that did not set SO_REUSEPORT.
        probe = listening_socket(args.host, args.port, listen=False)
    except OSError as exc:
        log.error("cannot bind %s:%s: %s", args.host, args.port, exc.strerror or exc)
        return 2
    options = {k: getattr(args, k) for k in ("host", "port", "app", "loop", "http", "lifespan", "log_level", "backlog", "graceful_timeout")}
    options["supervisor_pid"] = os.getpid()
    metrics_dir, made_here = _shared_metrics_dir()
    try:
        return Supervisor(options, args.workers).run()
    finally:
        probe.close()
        if made_here:
            shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
