"""Reads for the native API. Every query starts from the caller's application,
so another application's conversations are simply not found (404)."""

from django.db.models import QuerySet
from django.http import Http404

from conversations.models import Conversation, Message, ProviderCall
from governance.models import Application


def conversations_of(*, application: Application) -> QuerySet[Conversation]:
    return Conversation.objects.filter(application=application)


def conversation_of(*, application: Application, external_id: str) -> Conversation:
    conv = conversations_of(application=application).filter(external_id=external_id).first()
    if conv is None:
        raise Http404(f"No conversation '{external_id}' for this application.")
    return conv


def transcript(*, conversation: Conversation) -> list[Message]:
    """The conversation as the bot last saw it: the newest answered call's
    request followed by its answer (history is re-sent on every call, so that
    call holds all earlier turns)."""
    call = (
        ProviderCall.objects.filter(conversation=conversation, status=ProviderCall.Status.SUCCEEDED)
        .order_by("-created_at", "-id")
        .first()
    )
    if call is None:
        return []
    return list(Message.objects.filter(call=call).order_by("direction", "position"))


def call_of(*, application: Application, request_id: str) -> ProviderCall:
    """The application's newest call with this request id (ids come from
    clients and are not globally unique)."""
    call = (
        ProviderCall.objects.filter(application=application, request_id=request_id)
        .order_by("-created_at", "-id")
        .prefetch_related("flags")
        .first()
    )
    if call is None:
        raise Http404(f"No call '{request_id}' for this application.")
    return call
