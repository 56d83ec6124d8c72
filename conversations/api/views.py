"""Native API for a bot: its own conversations, their messages, and
server-side history (send only the new user message; the platform keeps the
rest). Views parse, call a selector or the gateway pipeline, and serialize."""

import uuid

from asgiref.sync import async_to_sync
from django.db import IntegrityError
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status
from rest_framework.exceptions import APIException
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response
from rest_framework.views import APIView

from conversations.api import selectors
from conversations.api.serializers import (
    CallStatusSerializer,
    ConversationCreateSerializer,
    ConversationSerializer,
    FlagSerializer,
    MessageSerializer,
    TurnResultSerializer,
    TurnSerializer,
)
from conversations.gateway.pipeline import complete_for_api
from conversations.gateway.validation import ChatRequest
from conversations.models import Conversation
from conversations.services import flag_answer


class _GatewayRefusal(APIException):
    def __init__(self, http_status: int, body: dict):
        self.status_code = http_status
        err = body.get("error") or {}
        super().__init__(detail=err.get("message", "refused"), code=err.get("code", "refused"))


class NewestFirst(CursorPagination):
    ordering = "-id"  # stable under concurrent inserts, unlike last activity


class ConversationList(generics.ListCreateAPIView):
    serializer_class = ConversationSerializer
    pagination_class = NewestFirst

    def get_queryset(self):
        return selectors.conversations_of(application=self.request.user)

    @extend_schema(request=ConversationCreateSerializer, responses={201: ConversationSerializer})
    def post(self, request, *args, **kwargs):
        data = ConversationCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        now = timezone.now()
        try:
            conv = Conversation.objects.create(
                application=request.user,
                external_id=data.validated_data.get("id") or "conv_" + uuid.uuid4().hex,
                end_user=data.validated_data["end_user"],
                title=data.validated_data["title"],
                started_at=now,
                last_activity_at=now,
            )
        except IntegrityError:
            return Response(
                {"error": {"message": "A conversation with this id already exists.", "type": "invalid_request_error", "code": "conflict", "param": "id"}},
                status=status.HTTP_409_CONFLICT,
            )
        return Response(ConversationSerializer(conv).data, status=status.HTTP_201_CREATED)


class ConversationDetail(generics.RetrieveAPIView):
    serializer_class = ConversationSerializer

    def get_object(self):
        return selectors.conversation_of(application=self.request.user, external_id=self.kwargs["conversation_id"])


class ConversationMessages(APIView):
    @extend_schema(responses=MessageSerializer(many=True))
    def get(self, request, conversation_id: str):
        conv = selectors.conversation_of(application=request.user, external_id=conversation_id)
        messages = selectors.transcript(conversation=conv)
        return Response(MessageSerializer(messages, many=True).data)

    @extend_schema(request=TurnSerializer, responses={201: TurnResultSerializer})
    def post(self, request, conversation_id: str):
        conv = selectors.conversation_of(application=request.user, external_id=conversation_id)
        turn = TurnSerializer(data=request.data)
        turn.is_valid(raise_exception=True)
        app = request.user
        history = [{"role": m.role, "content": m.content} for m in selectors.transcript(conversation=conv)]
        if not history and app.system_prompt:
            history = [{"role": "system", "content": app.system_prompt}]
        history.append({"role": "user", "content": turn.validated_data["content"]})
        chat = ChatRequest(
            model=turn.validated_data.get("model"),
            messages=history,
            max_tokens=turn.validated_data.get("max_tokens"),
            user=conv.end_user,
        )
        http_status, body, outcome = async_to_sync(complete_for_api)(
            request_id=request.request_id, api_key=request.auth, conversation_external_id=conv.external_id, chat=chat
        )
        if http_status >= 400:
            raise _GatewayRefusal(http_status, body)
        choice = body["choices"][0]
        result = {
            "conversation": conv.external_id,
            "request_id": request.request_id,
            "outcome": outcome,
            "message": {"role": "assistant", "content": choice["message"].get("content") or ""},
            "usage": body.get("usage"),
        }
        return Response(result, status=status.HTTP_201_CREATED)


def _call_status(call) -> dict:
    flags = list(call.flags.all())
    return {
        "request_id": call.request_id,
        "status": call.status,
        "outcome": call.outcome,
        "model_used": call.model_used,
        "created_at": call.created_at,
        "flagged": bool(flags),
        "flags": [{"reason": f.reason, "created_at": f.created_at} for f in flags],
        "user_message": call.application.flagged_message if flags else None,
    }


class CallStatus(APIView):
    """The bot asks whether an answer it showed was later flagged wrong."""

    @extend_schema(responses=CallStatusSerializer)
    def get(self, request, request_id: str):
        call = selectors.call_of(application=request.user, request_id=request_id)
        return Response(CallStatusSerializer(_call_status(call)).data)


class CallFlags(APIView):
    @extend_schema(request=FlagSerializer, responses={201: CallStatusSerializer})
    def post(self, request, request_id: str):
        call = selectors.call_of(application=request.user, request_id=request_id)
        data = FlagSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        flag_answer(call=call, reason=data.validated_data["reason"], api_key=request.auth)
        call = selectors.call_of(application=request.user, request_id=request_id)
        return Response(CallStatusSerializer(_call_status(call)).data, status=status.HTTP_201_CREATED)
