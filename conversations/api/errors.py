"""One error shape for the whole platform: OpenAI's
{"error": {"message", "type", "code", "param"}}, on the native API too."""

from django.core.exceptions import PermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def _flatten(detail, prefix=""):
    """First (param, message) pair of a DRF error detail."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = key if key != "non_field_errors" else ""
            return _flatten(value, f"{prefix}.{name}" if prefix and name else (name or prefix))
    if isinstance(detail, list) and detail:
        return _flatten(detail[0], prefix)
    return prefix or None, str(detail)


def exception_handler(exc, context):
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    if not isinstance(exc, exceptions.APIException):
        return None
    code = exc.get_codes()
    param, message = _flatten(exc.detail)
    if isinstance(code, dict | list):
        code = _flatten(code)[1]
    status_code = exc.status_code
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(status_code, "invalid_request_error" if status_code < 500 else "api_error"),
            "code": code,
            "param": param,
        }
    }
    headers = {}
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header
    if getattr(exc, "wait", None):
        headers["Retry-After"] = str(int(exc.wait))
    return Response(body, status=status_code or status.HTTP_400_BAD_REQUEST, headers=headers)
