"""Errors the gateway answers with, in OpenAI's body shape, each mapped to the
call's recorded status and the X-Governance-Outcome header."""

from dataclasses import dataclass, field

import orjson
from django.http import HttpResponse

from conversations.models import ProviderCall

Status = ProviderCall.Status
Outcome = ProviderCall.Outcome


@dataclass
class GatewayError(Exception):
    http_status: int
    message: str
    code: str
    type: str = "invalid_request_error"
    param: str | None = None
    status: str = Status.REFUSED
    outcome: str = Outcome.REFUSED
    headers: dict = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def response(self, request_id: str) -> HttpResponse:
        resp = HttpResponse(
            orjson.dumps(self.body()), status=self.http_status, content_type="application/json"
        )
        resp["X-Request-ID"] = request_id
        resp["X-Governance-Outcome"] = self.outcome
        resp["X-Error-Code"] = self.code
        for name, value in self.headers.items():
            resp[name] = value
        return resp


def invalid(message: str, *, code: str = "invalid_request", param: str | None = None) -> GatewayError:
    return GatewayError(400, message, code, param=param)


def auth_error(message: str, code: str) -> GatewayError:
    status = 403 if code == "application_suspended" else 401
    return GatewayError(
        status,
        message,
        code,
        type="invalid_request_error",
        headers={"WWW-Authenticate": 'Bearer realm="gateway"'},
    )


def upstream_error(
    http_status: int, message: str, code: str, *, type: str = "api_error", headers: dict | None = None
) -> GatewayError:
    return GatewayError(
        http_status,
        message,
        code,
        type=type,
        status=Status.FAILED,
        outcome=Outcome.FAILED,
        headers=headers or {},
    )


@dataclass
class PoliteRefusal(GatewayError):
    """A refusal answered as a normal chat completion whose text is the
    application's polite reply (HTTP 200, outcome refused)."""

    reason: str = ""
