from django.urls import path

from conversations.api import views

urlpatterns = [
    path("conversations/", views.ConversationList.as_view(), name="api-conversations"),
    path("conversations/<str:conversation_id>/", views.ConversationDetail.as_view(), name="api-conversation"),
    path("conversations/<str:conversation_id>/messages/", views.ConversationMessages.as_view(), name="api-messages"),
    path("calls/<str:request_id>/", views.CallStatus.as_view(), name="api-call"),
    path("calls/<str:request_id>/flags/", views.CallFlags.as_view(), name="api-call-flags"),
]
