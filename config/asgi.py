"""ASGI entry point.

The bot's OpenAI-compatible path (/v1/) skips the browser middleware stack
(sessions, CSRF, auth, messages, clickjacking, history): Django runs each of
those sync-style middlewares in a worker thread, twice per request, which costs
more than the gateway's own work. /v1/ keeps only the request-id middleware;
everything else (admin, API, health) goes through the full stack.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_application = get_asgi_application()

from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.core.handlers.exception import convert_exception_to_response  # noqa: E402

from config.middleware import RequestIdMiddleware  # noqa: E402


class GatewayASGIHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        get_response = self._get_response_async if is_async else self._get_response
        handler = convert_exception_to_response(get_response)
        self._middleware_chain = convert_exception_to_response(RequestIdMiddleware(handler))


gateway_application = GatewayASGIHandler()


async def application(scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith("/v1/"):
        return await gateway_application(scope, receive, send)
    return await django_application(scope, receive, send)
