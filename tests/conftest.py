"""Shared fixtures: a real provider simulator (subprocess), the real ASGI
gateway served by uvicorn on loopback, and a seeded application with a key."""

import asyncio
import socket
import threading
import time

import pytest
from django.conf import settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_connection(dbname: str | None = None, **kwargs):
    """A psycopg connection of its own to the test database (or `dbname` on
    the same server): another client, outside Django's connection handling."""
    import psycopg
    from django.db import connection

    s = connection.settings_dict
    return psycopg.connect(dbname=dbname or s["NAME"], user=s["USER"], host=s["HOST"] or None,
                           port=s["PORT"] or None, password=s["PASSWORD"] or None, **kwargs)


def database_url() -> str:
    """The test database, for a gateway started in another process."""
    from django.db import connection

    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    return f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


@pytest.fixture(scope="session")
def simulator():
    from simulator.testing import start_simulator_process

    with start_simulator_process(port=0, seed=1) as sim:
        yield sim


@pytest.fixture
def sim(simulator):
    """The simulator, reset before each test, and the gateway pointed at it."""
    import httpx

    from django.core.cache import caches

    from budgets import readings
    from conversations.gateway import breaker, shared

    httpx.post(f"{simulator.control_url}/reset", timeout=5).raise_for_status()
    caches["default"].clear()  # breakers, rate-limit windows and cached answers start fresh
    shared._local.clear()
    breaker.forget()
    readings.forget()
    old = settings.OPENAI_BASE_URL
    settings.OPENAI_BASE_URL = simulator.base_url
    yield simulator
    settings.OPENAI_BASE_URL = old


class _Server:
    def __init__(self):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            "config.asgi:application", host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", loop="asyncio"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def start(self):
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("gateway server did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session", autouse=True)
def _close_connections_before_teardown(django_db_setup):
    """Before the test database is dropped: the gateway's database threads
    hand back the connections they keep between sections (the native API's
    calls run there too), and Django's psycopg pools close. Left open, they
    made teardown warn "being accessed by other users" (the browser tests
    hand back their own: tests/test_admin_browser.py)."""
    yield
    from django.db import connections

    from conversations.gateway import dbsection

    if dbsection._executor is not None:
        asyncio.run(dbsection.close_connections())
    for conn in connections.all(initialized_only=True):
        conn.close()  # hands this thread's connection back to its pool, then the pool closes
        if conn.alias in getattr(type(conn), "_connection_pools", {}):
            conn.close_pool()


@pytest.fixture(scope="session")
def _gateway_server(django_db_setup, django_db_blocker):
    server = _Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gateway(_gateway_server, transactional_db, sim):
    """Base URL of the running gateway (real uvicorn, real simulator behind it)."""
    return _gateway_server.url


@pytest.fixture
def catalogue(transactional_db):
    from budgets.catalogue import seed_catalogue

    seed_catalogue()


@pytest.fixture
def app_key(catalogue):
    """(application, api_key, secret) for a fresh application."""
    from governance.models import Application
    from governance.services import create_api_key

    app = Application.objects.create(slug="support-bot", name="Support bot", default_model="gpt-4o-mini")
    issued = create_api_key(application=app, name="tests")
    return app, issued.api_key, issued.secret


@pytest.fixture
def other_app_key(catalogue):
    from governance.models import Application
    from governance.services import create_api_key

    app = Application.objects.create(slug="other-bot", name="Other bot", default_model="gpt-4o-mini")
    issued = create_api_key(application=app, name="tests")
    return app, issued.api_key, issued.secret


# Admin users, one per role the admin tests act as.
@pytest.fixture
def superuser(db):
    from tests.factories import make_user

    return make_user(username="root", superuser=True)


@pytest.fixture
def auditor(db):
    from governance.roles import AUDITOR
    from tests.factories import make_user

    return make_user(username="audrey", role=AUDITOR)


@pytest.fixture
def manager(db):
    from governance.roles import MANAGER
    from tests.factories import make_user

    return make_user(username="manon", role=MANAGER)
