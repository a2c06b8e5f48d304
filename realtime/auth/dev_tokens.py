"""Development sign-in: `POST /auth/dev-token` signs a bearer token for whoever the caller says it is.

It exists so that the demo page can be two people in two tabs without an identity provider. It proves nothing
about the caller, so it is off unless AUTH_DEV_TOKENS turns it on: `create_app` includes this router only then
(when off, the path is unknown and absent from the OpenAPI description), the settings refuse it without
AUTH_JWT_SECRET, and `realtime serve` refuses it on an address other machines can reach.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from realtime.auth.tokens import issue_token
from realtime.config import Settings
from realtime.errors import PROBLEM_JSON, Problem

PATH = "/auth/dev-token"
# Long enough for a demo session; the page asks for a new one when it runs out.
TTL_S = 3600
_log = logging.getLogger(__name__)

# Printable text without spaces or controls: a subject or role is an identifier, and this one ends up in logs.
_IDENTIFIER = r"^[!-~]+$"
Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=_IDENTIFIER)]


class DevTokenRequest(BaseModel):
    """Who the token should say the caller is."""

    model_config = ConfigDict(extra="forbid")

    sub: Identifier = Field(description="The subject (user id) the token names.", examples=["1"])
    role: Identifier | None = Field(
        default=None, description="The role, put where AUTH_ROLE_CLAIM points.", examples=["member"]
    )


class DevToken(BaseModel):
    token: str = Field(description="An HS256 JWT signed with AUTH_JWT_SECRET; send it as `Bearer <token>`.")
    exp: int = Field(description="When it expires, in seconds since the epoch.")


router = APIRouter(tags=["development"])
# A bad body is answered as everywhere else in the API: problem+json (see errors._on_validation).
_INVALID = {"model": Problem, "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


@router.post(
    PATH,
    responses={422: _INVALID},
    summary="Sign a token for any subject and role (development only: AUTH_DEV_TOKENS)",
)
async def dev_token(body: DevTokenRequest, request: Request) -> DevToken:
    settings: Settings = request.state.settings
    exp = int(time.time()) + TTL_S
    # `exp` is passed as a claim so the answer states the token's own value, not one computed a moment apart.
    token = issue_token(settings, sub=body.sub, role=body.role, ttl_s=TTL_S, claims={"exp": exp})
    _log.info("dev token signed for sub %r, role %r", body.sub, body.role)
    return DevToken(token=token, exp=exp)
