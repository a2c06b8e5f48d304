"""Smoke: the served app creates and reads a user over real HTTP."""

from collections.abc import AsyncIterator

import httpx


async def test_create_then_get(http: httpx.AsyncClient) -> None:
    """A created user can be read back with the same ETag."""
    created = await http.post("/users", json={"name": "Ada", "email": "ada-smoke@example.com"})
    assert created.status_code == 201
    fetched = await http.get(created.headers["location"])
    assert fetched.status_code == 200
    assert fetched.json() == created.json()
    assert fetched.headers["etag"] == created.headers["etag"] == '"1"'


async def test_oversized_bodies_are_refused_before_reading(http: httpx.AsyncClient) -> None:
    """A body over MAX_BODY_BYTES gets 413 problem+json, declared or chunked, and creates nothing."""
    email = "too-big@example.com"
    body = b'{"name": "' + b"x" * (2 << 20) + b'", "email": "' + email.encode() + b'"}'
    declared = await http.post("/users", content=body, headers={"content-type": "application/json"})

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    chunked = await http.post("/users", content=chunks(), headers={"content-type": "application/json"})
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"] == "/problems/payload-too-large"
    listing = (await http.get("/users", params={"limit": 500})).json()["items"]
    assert email not in {user["email"] for user in listing}
