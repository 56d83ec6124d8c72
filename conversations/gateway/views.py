"""OpenAI-compatible endpoints. Views only parse, call and render."""

import orjson
from django.db import Error as DatabaseError
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt

from budgets.selectors import models_in_service
from conversations.gateway.admission import Headers
from conversations.gateway.dbsection import db_section
from conversations.gateway.errors import GatewayError, auth_error
from conversations.gateway.pipeline import handle_chat_completion
from governance.selectors import KeyRejected, key_for_secret


def _method_not_allowed(request, allowed: str) -> HttpResponse:
    err = GatewayError(405, f"{request.method} is not allowed here; use {allowed}.", "method_not_allowed")
    resp = err.response(request.request_id)
    resp["Allow"] = allowed
    return resp


@csrf_exempt
async def chat_completions(request):
    if request.method != "POST":
        return _method_not_allowed(request, "POST")
    return await handle_chat_completion(request)


def _models_listing(*, secret: str) -> list[dict]:
    key_for_secret(secret=secret)
    return [
        {"id": pm.model.name, "object": "model", "created": int(pm.model.created_at.timestamp()), "owned_by": "governance-gateway"}
        for pm in models_in_service()
    ]


@csrf_exempt
async def list_models(request):
    if request.method != "GET":
        return _method_not_allowed(request, "GET")
    try:
        data = await db_section(_models_listing, secret=Headers.from_meta(request.META).secret())
    except KeyRejected as exc:
        return auth_error(exc.message, exc.code).response(request.request_id)
    except DatabaseError:
        return GatewayError(503, "The gateway's database is unavailable.", "database_unavailable", type="api_error").response(request.request_id)
    resp = HttpResponse(orjson.dumps({"object": "list", "data": data}), content_type="application/json")
    resp["X-Governance-Outcome"] = "answered"
    return resp
