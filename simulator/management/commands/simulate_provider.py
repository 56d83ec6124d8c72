"""``manage.py simulate_provider``: run the OpenAI-compatible provider simulator.

Django only supplies the command plumbing; the server is plain asyncio
(see ``simulator.server``). Prints one line once it is listening::

    simulator listening on http://127.0.0.1:8765/v1 (control http://127.0.0.1:8765/_sim, ...)

and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import ipaddress
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from simulator.server import FAULT_NAMES, SimulatorConfig, SimulatorServer, run


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Command(BaseCommand):
    help = "Run an OpenAI-compatible provider simulator with fault injection (loopback by default)."

    requires_system_checks: list = []  # starts fast and needs no database

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1", help="Bind address (default 127.0.0.1, loopback).")
        parser.add_argument("--port", type=int, default=getattr(settings, "SIMULATOR_PORT", 8765),
                            help="Port; 0 picks a free one (printed). Default settings.SIMULATOR_PORT.")
        parser.add_argument("--latency-ms", type=float, default=0.0, help="Delay before each chat response.")
        parser.add_argument("--jitter-ms", type=float, default=0.0,
                            help="Uniform jitter added to the latency: +/- this many ms (seeded).")
        parser.add_argument("--seed", type=int, default=0, help="Seed for answers, fault draws and jitter.")
        parser.add_argument("--fail-rate", type=float, default=0.0,
                            help="Probability (0..1) that a chat request gets a random fault from --faults.")
        parser.add_argument("--faults", default=",".join(FAULT_NAMES),
                            help=f"Comma-separated faults to draw from (default {','.join(FAULT_NAMES)}).")
        parser.add_argument("--retry-after", type=float, default=1, help="Retry-After seconds sent with 429.")
        parser.add_argument("--hang-s", type=float, default=120.0, help="How long the 'hang' fault stays silent.")
        parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="Delay between stream chunks.")
        parser.add_argument("--log-file", default=None, help="Append one JSON line per chat request to this file.")

    def handle(self, *args, **options):
        if not 0 <= options["port"] <= 65535:
            raise CommandError("--port must be between 0 and 65535")
        try:
            config = SimulatorConfig(
                host=options["host"],
                port=options["port"],
                latency_ms=options["latency_ms"],
                jitter_ms=options["jitter_ms"],
                seed=options["seed"],
                fail_rate=options["fail_rate"],
                faults=options["faults"],
                retry_after=options["retry_after"],
                hang_s=options["hang_s"],
                chunk_delay_ms=options["chunk_delay_ms"],
                log_file=options["log_file"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if not _is_loopback(config.host):
            self.stderr.write(f"warning: binding {config.host}, which is not loopback; the simulator has no auth.")

        def announce(server: SimulatorServer) -> None:
            self.stdout.write(
                f"simulator listening on {server.base_url} (control {server.control_url}, "
                f"latency {config.latency_ms:g}ms +/- {config.jitter_ms:g}ms, fail-rate {config.fail_rate:g}, "
                f"faults {','.join(config.faults) or '-'}, seed {config.seed})"
            )
            self.stdout.flush()

        try:
            run(config, on_listening=announce)
        except OSError as exc:
            raise CommandError(f"cannot listen on {config.host}:{config.port}: {exc}") from exc
        self.stdout.write("simulator stopped")
        self.stdout.flush()
        sys.stdout.flush()
