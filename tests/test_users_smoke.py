"""Smoke: the served app creates and reads a user over real HTTP."""

import httpx


async def test_create_then_get(http: httpx.AsyncClient) -> None:
    """A created user can be read back with the same ETag."""
    created = await http.post("/users", json={"name": "Ada", "email": "ada-smoke@example.com"})
    assert created.status_code == 201
    fetched = await http.get(created.headers["location"])
    assert fetched.status_code == 200
    assert fetched.json() == created.json()
    assert fetched.headers["etag"] == created.headers["etag"] == '"1"'
