"""The REST side of authentication: one dependency, applied to whole routers, that identifies the caller."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request

from realtime.auth.tokens import Identity, KeysUnavailable, TokenError, TokenVerifier
from realtime.errors import Unauthorized, Unavailable

BEARER_SCHEME = "bearerAuth"


async def authenticate(request: Request) -> Identity | None:
    """The caller's identity from its bearer token (401 without a valid one), or None when the server is open.

    The identity is also left in `request.state.identity` for what runs after it. The header is read here rather
    than through FastAPI's `HTTPBearer`, whose extra dependency every request would pay for in open mode too; the
    OpenAPI description gets the scheme from `declare_bearer_auth` when tokens are on.
    """
    verifier: TokenVerifier | None = request.state.auth
    if verifier is None:
        request.state.identity = None
        return None
    header = request.headers.get("authorization")
    if header is None:
        raise Unauthorized("missing bearer token: send `Authorization: Bearer <token>`")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must be `Bearer <token>`")
    try:
        identity = await verifier.verify(token)
    except TokenError as error:
        raise Unauthorized(str(error)) from None
    except KeysUnavailable as error:
        raise Unavailable(f"{error}; retry shortly") from None
    request.state.identity = identity
    return identity


def declare_bearer_auth(app: FastAPI) -> None:
    """Say in the OpenAPI description that every operation that answers 401 needs a bearer token (only when the
    server has a token key: an open server's description must not ask clients for one)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[BEARER_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "A JWT in `Authorization: Bearer <token>`.",
        }
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict) and "401" in operation.get("responses", {}):
                    operation["security"] = [{BEARER_SCHEME: []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


IdentityDep = Annotated[Identity | None, Depends(authenticate)]
