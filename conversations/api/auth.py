"""The native API authenticates the same application keys as the gateway; the
authenticated principal is the ApiKey, and every query is scoped to its
application, so one application never sees another's data."""

from rest_framework import authentication, exceptions, permissions

from governance.selectors import KeyRejected, key_for_secret
from governance.services import touch_key


class ApplicationKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise exceptions.AuthenticationFailed("Send the key as 'Authorization: Bearer <application key>'.")
        try:
            key = key_for_secret(secret=secret.strip())
        except KeyRejected as exc:
            raise exceptions.AuthenticationFailed(exc.message, code=exc.code) from None
        touch_key(api_key_id=key.pk, resolution_s=60)
        return (key.application, key)

    def authenticate_header(self, request):
        return 'Bearer realm="api"'


class IsApplication(permissions.BasePermission):
    message = "An application key is required: 'Authorization: Bearer <application key>'."

    def has_permission(self, request, view):
        return request.auth is not None
