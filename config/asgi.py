"""ASGI entry point.

The bot's OpenAI-compatible path (/v1/) is served by a plain ASGI application
(conversations/gateway/asgi.py) that skips Django's request cycle: no browser
middleware, no per-request thread for synchronous signal receivers. Everything
else (admin, native API, health, metrics) goes through Django's full stack.
Lifespan events are answered here (Django's handler does not speak them):
shutdown closes the provider connection pools and database connections.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_application = get_asgi_application()

from conversations.gateway.asgi import GatewayApp  # noqa: E402

gateway_application = GatewayApp()

from conversations.gateway.warmup import prepare_process  # noqa: E402

prepare_process()  # last: everything imported so far is frozen out of garbage collection


async def _lifespan(receive, send) -> None:
    """Startup needs nothing; shutdown closes the provider connection pools
    and the database threads' connections."""
    from conversations.gateway.dbsection import close_connections
    from conversations.gateway.provider import close_sessions

    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await close_sessions()
            await close_connections()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith("/v1/"):
        return await gateway_application(scope, receive, send)
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    return await django_application(scope, receive, send)
