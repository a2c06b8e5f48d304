"""HTTP bodies of the users resource."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, model_validator

MAX_ID = 2**63 - 1


def _printable(value: str) -> str:
    # PostgreSQL text cannot hold NUL; refusing it here turns a would-be database error into a 422.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)]
Email = Annotated[EmailStr, Field(max_length=320)]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    email: Email


class UserUpdate(BaseModel):
    """A partial update: only the fields present change; at least one must be present."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    email: Email | None = None

    @model_validator(mode="after")
    def _something_to_change(self) -> UserUpdate:
        if not self.model_fields_set:
            raise ValueError("give at least one of: name, email")
        for field in self.model_fields_set:
            if getattr(self, field) is None:
                raise ValueError(f"{field} cannot be null")
        return self


class User(BaseModel):
    id: int
    name: str
    email: str
    created_at: datetime
    updated_at: datetime
    version: int


class UserPage(BaseModel):
    """One page of users in id order; pass `next_after` as `after` to get the next page (null: no more)."""

    items: list[User]
    next_after: int | None
