from rest_framework import serializers

from conversations.models import Conversation, Message


class ConversationSerializer(serializers.ModelSerializer):
    id = serializers.CharField(source="external_id", read_only=True)
    total_cost_usd = serializers.DecimalField(max_digits=24, decimal_places=12, read_only=True, coerce_to_string=True)

    class Meta:
        model = Conversation
        fields = ["id", "end_user", "title", "started_at", "last_activity_at", "call_count", "total_tokens", "total_cost_usd"]
        read_only_fields = fields


class ConversationCreateSerializer(serializers.Serializer):
    id = serializers.RegexField(
        r"^[\x21-\x7e]{1,128}$",
        required=False,
        help_text="Your own id for the conversation (as you would send in X-Conversation-ID); generated if omitted.",
        error_messages={"invalid": "id must be 1-128 printable ASCII characters without spaces."},
    )
    end_user = serializers.CharField(max_length=128, required=False, allow_blank=True, default="")
    title = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")


class MessageSerializer(serializers.ModelSerializer):
    request_id = serializers.CharField(source="call.request_id", read_only=True)

    class Meta:
        model = Message
        fields = ["role", "content", "direction", "request_id", "created_at"]
        read_only_fields = fields


class TurnSerializer(serializers.Serializer):
    content = serializers.CharField(max_length=200_000, trim_whitespace=False, help_text="The end user's message.")
    model = serializers.CharField(max_length=100, required=False, help_text="Defaults to the application's model.")
    max_tokens = serializers.IntegerField(min_value=1, max_value=1_000_000, required=False)

    def validate_content(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("content is empty.")
        if "\x00" in value:
            raise serializers.ValidationError("content contains a NUL character (\\u0000).")
        return value


class TurnResultSerializer(serializers.Serializer):
    conversation = serializers.CharField()
    request_id = serializers.CharField()
    outcome = serializers.CharField()
    message = serializers.DictField()
    usage = serializers.DictField(allow_null=True)


class FlagSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=2000, help_text="What was wrong with the answer.")
    created_at = serializers.DateTimeField(read_only=True)

    def validate_reason(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("reason is empty.")
        return value


class CallStatusSerializer(serializers.Serializer):
    request_id = serializers.CharField()
    status = serializers.CharField()
    outcome = serializers.CharField()
    model_used = serializers.CharField()
    created_at = serializers.DateTimeField()
    flagged = serializers.BooleanField()
    flags = FlagSerializer(many=True)
    user_message = serializers.CharField(allow_null=True, help_text="What to show the end user, if anything.")
