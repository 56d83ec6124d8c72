"""Set up the embedded default and, with --serve, run it.

migrate → model catalogue and prices → the `support-bot` application →
demo logins and a fresh API key → a few days of demo conversations → (serve:
the provider simulator and the ASGI server). Safe to run again: it adds what
is missing and prints fresh credentials.
"""

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from budgets.catalogue import seed_catalogue
from conversations.demo import seed_history
from governance.models import Application
from governance.roles import sync_roles
from governance.services import create_api_key

DEMO_USERS = [("admin", None, True), ("manager", "Manager", False), ("auditor", "Auditor", False), ("reviewer", "Reviewer", False)]


class Command(BaseCommand):
    help = "Migrate, seed demo data, print logins and a key; with --serve, run the simulator and the platform."

    def add_arguments(self, parser):
        parser.add_argument("--serve", action="store_true", help="start the simulator and the web server")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--no-demo-data", action="store_true", help="skip the demo conversations")

    def _ensure_database(self) -> None:
        """On Postgres, create the database if it is missing, and say plainly
        when the server cannot be reached (the pool would only time out)."""
        from governance.dbsetup import DatabaseUnreachable, Target, ensure_postgres_database

        db = settings.DATABASES["default"]
        if db["ENGINE"] != "django.db.backends.postgresql":
            return
        target = Target.from_settings(db)
        try:
            if ensure_postgres_database(target):
                self.stdout.write(f"Created the PostgreSQL database '{target.name}' on {target.where()}.")
        except DatabaseUnreachable as exc:
            raise CommandError(str(exc)) from None

    def handle(self, *args, serve, host, port, no_demo_data, **options):
        self._ensure_database()
        call_command("migrate", interactive=False, verbosity=0)
        sync_roles()  # the role groups as the code defines them, whatever the database held
        User = get_user_model()
        password = secrets.token_urlsafe(9)
        admin = None
        for username, group, is_super in DEMO_USERS:
            user, _ = User.objects.get_or_create(username=username, defaults={"email": f"{username}@example.com"})
            user.is_staff = True
            user.is_superuser = is_super
            user.set_password(password)
            user.save()
            if group:
                user.groups.add(Group.objects.get(name=group))
            if is_super:
                admin = user
        seed_catalogue(actor=admin)
        app = Application.objects.filter(slug="support-bot").first()
        fresh_app = app is None
        if fresh_app:
            app = Application(
                slug="support-bot", name="Acme support bot", owner=admin, status=Application.Status.PILOT,
                default_model="gpt-4o-mini",
                system_prompt="You are Acme's support assistant. Answer briefly and politely; never promise refunds.",
            )
            app._history_user = admin
            app.save()
        issued = create_api_key(application=app, name="quickstart demo key", actor=admin)
        if fresh_app and not no_demo_data:
            n = seed_history(application=app, api_key=issued.api_key)
            self.stdout.write(f"Seeded {n} demo conversations over the last 4 days.")

        base = f"http://{host}:{port}"
        self.stdout.write(
            "\n".join(
                [
                    "",
                    "GenAI governance gateway is set up.",
                    f"  Admin:        {base}/admin/",
                    f"  Logins:       admin / manager / auditor / reviewer, password: {password}",
                    f"  API key:      {issued.secret}   (support-bot; shown once)",
                    f"  OpenAI base:  {base}/v1",
                    f"  API docs:     {base}/api/docs/",
                    f"  Provider:     {settings.OPENAI_BASE_URL}",
                    "",
                    "  Try it:",
                    f"    curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {issued.secret}' \\",
                    "      -H 'Content-Type: application/json' -H 'X-Conversation-ID: hello-1' \\",
                    "      -d '{\"model\": \"gpt-4o-mini\", \"messages\": [{\"role\": \"user\", \"content\": \"How do I reset my password?\"}]}'",
                    "",
                ]
            )
        )
        if serve:
            self._serve(host, port)

    def _serve(self, host: str, port: int) -> None:
        import uvicorn

        sim = None
        if "OPENAI_BASE_URL" not in os.environ:
            sim = subprocess.Popen(
                [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "simulate_provider", "--port", str(settings.SIMULATOR_PORT), "--latency-ms", "300", "--jitter-ms", "200"],
                cwd=settings.BASE_DIR,
            )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    httpx.get(f"http://127.0.0.1:{settings.SIMULATOR_PORT}/healthz", timeout=0.5)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
        self.stdout.write(f"Serving on http://{host}:{port}/  (Ctrl-C to stop)")
        try:
            uvicorn.run("config.asgi:application", host=host, port=port, log_level="warning", lifespan="off")
        finally:
            if sim is not None:
                sim.send_signal(signal.SIGTERM)
                sim.wait(timeout=10)
