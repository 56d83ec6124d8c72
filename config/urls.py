from django.conf import settings
from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from conversations.gateway import views as gateway
from governance import health

urlpatterns = [
    path("v1/chat/completions", gateway.chat_completions, name="chat-completions"),
    path("v1/models", gateway.list_models, name="models"),
    path("api/v1/", include("conversations.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics, name="metrics"),
    path("admin/", admin.site.urls),
]

if settings.SERVE_STATIC:
    from django.contrib.staticfiles.views import serve as static_serve

    urlpatterns += [re_path(r"^static/(?P<path>.*)$", static_serve, {"insecure": True})]
