"""Bearer tokens: the one place that decides who a request is, for REST and for the WebSocket alike.

A `TokenVerifier` is compiled once from the settings when the app is created: its key source (an HS256
secret, a PEM public key, or the identity provider's JWKS), the algorithms that key source accepts, and the
claims every token must carry. `verify()` turns a token into an `Identity` or raises `TokenError` with a
message precise enough for the client to act on (expired, bad signature, wrong audience...).

Algorithms are pinned by the key source, never taken from the token: an HS256 secret accepts HS256 only, a
public key accepts the one algorithm of its type (RS256 for RSA, ES256 for P-256), so `alg: none` and
algorithm confusion (an HS256 token "signed" with the public key) are refused before any signature check.

JWKS lifecycle (keys of an identity provider):
    first use    the key set is fetched with PyJWT's PyJWKClient, in a thread (never on the event loop)
    known kid    served from this module's cache without I/O, for up to JWKS_MAX_AGE_S
    unknown kid  the key set is fetched again (a rotation), at most once per JWKS_MIN_REFETCH_S, and one fetch
                 is shared by every request waiting for it; a kid still unknown after it is refused
    stale        past JWKS_MAX_AGE_S the next token refetches, so a key the provider withdrew stops working
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.exceptions import InvalidSubjectError

from realtime.config import Settings

# Tokens of real identity providers are 1-2 KiB; a larger one is refused before it is parsed.
MAX_TOKEN_BYTES = 8192
JWKS_MAX_AGE_S = 300.0
JWKS_MIN_REFETCH_S = 1.0
JWKS_FETCH_TIMEOUT_S = 5.0
_ASYMMETRIC = ("RS256", "ES256")
_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token says the caller is. `claims` is the whole payload, for the row-level policies."""

    sub: str
    role: str | None
    exp: int
    claims: Mapping[str, Any]


class TokenError(Exception):
    """A token that does not prove an identity; the message says why (it is sent to the client)."""


class KeysUnavailable(Exception):
    """The identity provider's key set could not be fetched: not the token's fault, retry shortly."""


class _JwksKeys:
    """The signing keys of a JWKS URL by `kid`, looked up without I/O once fetched (see the module docstring).

    PyJWKClient fetches and parses the key set; its own cache is not used because looking a key up in it may
    fetch on the calling thread, which here is the event loop.
    """

    def __init__(self, url: str) -> None:
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, cache_keys=False, timeout=JWKS_FETCH_TIMEOUT_S)
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._fetching: asyncio.Future[list[jwt.PyJWK]] | None = None

    async def key(self, kid: str) -> jwt.PyJWK:
        now = time.monotonic()
        age = None if self._fetched_at is None else now - self._fetched_at
        if kid in self._keys and age is not None and age < JWKS_MAX_AGE_S:
            return self._keys[kid]
        if age is None or age >= JWKS_MIN_REFETCH_S or self._fetching is not None:
            try:
                await self._refresh()
            except KeysUnavailable:
                if kid not in self._keys:
                    raise
                # A key we hold only went stale: the provider being away is no reason to refuse it meanwhile.
                _log.warning("JWKS refetch failed; still using the cached key %r", kid)
        key = self._keys.get(kid)
        if key is None:
            raise TokenError(f"unknown key id (kid) {kid!r}: the identity provider's key set does not have it")
        return key

    async def _refresh(self) -> None:
        if self._fetching is None:
            self._fetching = asyncio.ensure_future(asyncio.to_thread(self._client.get_signing_keys, refresh=True))
        fetching = self._fetching
        try:
            keys = await asyncio.shield(fetching)
        except (jwt.PyJWTError, OSError, ValueError) as error:
            raise KeysUnavailable(f"the identity provider's keys could not be fetched: {error}") from None
        finally:
            if self._fetching is fetching and fetching.done():
                self._fetching = None
        self._keys = {key.key_id: key for key in keys if key.key_id and key.algorithm_name in _ASYMMETRIC}
        self._fetched_at = time.monotonic()


class TokenVerifier:
    """Verifies bearer tokens against the configured key source; build it with `TokenVerifier.from_settings`."""

    def __init__(
        self,
        *,
        key: tuple[Any, str] | None = None,
        jwks: _JwksKeys | None = None,
        audience: str | None,
        issuer: str | None,
        role_claim: str,
        leeway_s: float,
    ) -> None:
        self._key = key  # a fixed key and the one algorithm it verifies, or None with a JWKS
        self._jwks = jwks
        self._audience = audience
        self._issuer = issuer
        self._role_path = tuple(role_claim.split("."))
        self.leeway_s = leeway_s
        self._options: Any = {
            "require": ["exp", "sub"],
            "verify_aud": audience is not None,
            "verify_iss": issuer is not None,
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier | None:
        """The verifier the settings describe, or None when no key is configured (open mode).

        Raises ValueError when the configured key cannot be used (unreadable file, unsupported key type).
        """
        common: dict[str, Any] = {
            "audience": settings.auth_audience,
            "issuer": settings.auth_issuer,
            "role_claim": settings.auth_role_claim,
            "leeway_s": settings.auth_leeway_s,
        }
        if settings.auth_jwt_secret is not None:
            return cls(key=(settings.auth_jwt_secret, "HS256"), **common)
        if settings.auth_public_key_file is not None:
            return cls(key=_load_public_key(settings.auth_public_key_file.read_bytes()), **common)
        if settings.auth_jwks_url is not None:
            return cls(jwks=_JwksKeys(settings.auth_jwks_url), **common)
        return None

    async def verify(self, token: str) -> Identity:
        """The identity a token proves; TokenError says why it proves none, KeysUnavailable when keys are away."""
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError(f"token is longer than {MAX_TOKEN_BYTES} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise TokenError("malformed token: not a JWS compact serialization (header.payload.signature)") from None
        alg = header.get("alg")
        if self._jwks is not None:
            if alg not in _ASYMMETRIC:
                raise TokenError(f"algorithm {alg!r} is not accepted; tokens must be signed with RS256 or ES256")
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid:
                raise TokenError("token header has no key id (kid), which a JWKS key set needs")
            jwk = await self._jwks.key(kid)
            key, algorithm = jwk.key, jwk.algorithm_name
        else:
            assert self._key is not None
            key, algorithm = self._key
        if alg != algorithm:
            raise TokenError(f"algorithm {alg!r} is not accepted; this key verifies {algorithm} tokens only")
        return self._decode(token, key, algorithm)

    def _decode(self, token: str, key: Any, algorithm: str) -> Identity:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                options=self._options,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self.leeway_s,
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.InvalidSignatureError:
            raise TokenError("bad signature: the token was not signed by the configured key") from None
        except jwt.MissingRequiredClaimError as error:
            raise TokenError(f"token has no {error.claim!r} claim, which is required") from None
        except jwt.InvalidAudienceError:
            raise TokenError(f"wrong audience: 'aud' must be {self._audience!r}") from None
        except jwt.InvalidIssuerError:
            raise TokenError(f"wrong issuer: 'iss' must be {self._issuer!r}") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("token not valid yet ('nbf' is in the future)") from None
        except jwt.InvalidIssuedAtError:
            raise TokenError("token issued in the future ('iat')") from None
        except InvalidSubjectError:
            raise TokenError("'sub' must be a string") from None
        except jwt.InvalidTokenError as error:
            raise TokenError(f"invalid token: {error}") from None
        role = claim_at(claims, self._role_path)
        if role is not None and not isinstance(role, str):
            raise TokenError(f"claim {'.'.join(self._role_path)!r} (the role) must be a string")
        return Identity(sub=claims["sub"], role=role, exp=int(claims["exp"]), claims=claims)


def claim_at(claims: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at a dotted claim path (`app_metadata.role`), or None when any step is missing."""
    value: Any = claims
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _load_public_key(pem: bytes) -> tuple[Any, str]:
    """A PEM public key and the one algorithm it verifies."""
    try:
        key = load_pem_public_key(pem)
    except ValueError as error:
        raise ValueError(f"AUTH_PUBLIC_KEY_FILE is not a PEM public key: {error}") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"AUTH_PUBLIC_KEY_FILE: RSA keys must have at least 2048 bits, not {key.key_size}")
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ValueError("AUTH_PUBLIC_KEY_FILE must hold an RSA (RS256) or P-256 EC (ES256) public key")


def set_claim(claims: dict[str, Any], path: str, value: Any) -> None:
    """Put `value` at a dotted claim path, creating the objects on the way (for `realtime token`)."""
    *parents, last = path.split(".")
    target = claims
    for part in parents:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"claim {part!r} is not an object, so {path!r} cannot be set")
        target = child
    target[last] = value


def issue_token(settings: Settings, *, sub: str, role: str | None, ttl_s: int, claims: Mapping[str, Any]) -> str:
    """An HS256 token signed with AUTH_JWT_SECRET that this server accepts (for `realtime token`).

    `role` goes where AUTH_ROLE_CLAIM points; `claims` maps dotted paths to values and may override anything.
    """
    if settings.auth_jwt_secret is None:
        raise ValueError("AUTH_JWT_SECRET is not set")
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl_s}
    if settings.auth_audience is not None:
        payload["aud"] = settings.auth_audience
    if settings.auth_issuer is not None:
        payload["iss"] = settings.auth_issuer
    if role is not None:
        set_claim(payload, settings.auth_role_claim, role)
    for path, value in claims.items():
        set_claim(payload, path, value)
    return jwt.encode(payload, settings.auth_jwt_secret, algorithm="HS256")
