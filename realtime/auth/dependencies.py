"""The REST side of authentication: one dependency, applied to whole routers, that identifies the caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from realtime.auth.tokens import Identity, KeysUnavailable, TokenError, TokenVerifier
from realtime.errors import Unauthorized, Unavailable

# auto_error=False: the answer to a missing or malformed header is ours (problem+json with a precise detail).
_bearer = HTTPBearer(
    auto_error=False,
    description="A JWT in `Authorization: Bearer <token>`, when the server has a token key configured.",
)


async def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> Identity | None:
    """The caller's identity from its bearer token (401 without a valid one), or None when the server is open.

    The identity is also left in `request.state.identity` for what runs after it.
    """
    verifier: TokenVerifier | None = request.state.auth
    if verifier is None:
        request.state.identity = None
        return None
    if credentials is None:
        if "authorization" in request.headers:
            raise Unauthorized("the Authorization header must be `Bearer <token>`")
        raise Unauthorized("missing bearer token: send `Authorization: Bearer <token>`")
    try:
        identity = await verifier.verify(credentials.credentials)
    except TokenError as error:
        raise Unauthorized(str(error)) from None
    except KeysUnavailable as error:
        raise Unavailable(f"{error}; retry shortly") from None
    request.state.identity = identity
    return identity


IdentityDep = Annotated[Identity | None, Depends(authenticate)]
