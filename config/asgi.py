"""ASGI entry point.

The bot's OpenAI-compatible path (/v1/) is served by a plain ASGI application
(conversations/gateway/asgi.py) that skips Django's request cycle: no browser
middleware, no per-request thread for synchronous signal receivers. Everything
else (admin, native API, health, metrics) goes through Django's full stack.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_application = get_asgi_application()

from conversations.gateway.asgi import GatewayApp  # noqa: E402

gateway_application = GatewayApp()


async def application(scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith("/v1/"):
        return await gateway_application(scope, receive, send)
    return await django_application(scope, receive, send)
