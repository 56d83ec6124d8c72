"""Correlation ids: accepted from X-Request-ID or generated, echoed on every
response, bound to every log line of the request."""

import re
import uuid

import structlog
from asgiref.sync import iscoroutinefunction, markcoroutinefunction

_VALID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def request_id_from(meta) -> str:
    """A client-supplied id is kept only if it is short and printable, so it
    cannot inject into logs or headers."""
    supplied = meta.get("HTTP_X_REQUEST_ID", "")
    return supplied if supplied and _VALID.match(supplied) else new_request_id()


class RequestIdMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def _begin(self, request):
        request.request_id = request_id_from(request.META)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request.request_id)

    def __call__(self, request):
        if self._async:
            return self.__acall__(request)
        self._begin(request)
        response = self.get_response(request)
        response["X-Request-ID"] = request.request_id
        return response

    async def __acall__(self, request):
        self._begin(request)
        response = await self.get_response(request)
        response["X-Request-ID"] = request.request_id
        return response
