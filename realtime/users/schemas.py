"""HTTP bodies of the users resource."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from realtime.timestamps import format_timestamp

MAX_ID = 2**63 - 1

# What `_printable` enforces, spelled as the JSON Schema `pattern` of names, so that generated clients and
# schema-driven test tools know which names are valid: no NUL anywhere, at least one non-whitespace character.
NAME_PATTERN = r"^[^\x00]*[^\x00\s][^\x00]*$"
_NON_BLANK = re.compile(r"\S")


def _printable(value: str) -> str:
    # PostgreSQL text cannot hold NUL; refusing it here turns a would-be database error into a 422.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if not _NON_BLANK.search(value):
        raise ValueError("must not be blank")
    return value


Name = Annotated[
    str,
    Field(min_length=1, max_length=200, json_schema_extra={"pattern": NAME_PATTERN}),
    AfterValidator(_printable),
]
Email = Annotated[EmailStr, Field(max_length=320)]
# Rendered as PostgreSQL renders it in change frames and snapshots, so both sides compare as strings.
Timestamp = Annotated[
    datetime,
    PlainSerializer(format_timestamp, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time", "examples": ["2026-11-26T07:38:58.202697+00:00"]}),
]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    email: Email


def _absent_not_null(schema: dict[str, Any]) -> None:
    """Document what validation enforces: a field may be left out but never be null, and one must be given."""
    for prop in schema["properties"].values():
        variants = [variant for variant in prop.pop("anyOf", []) if variant.get("type") != "null"]
        if len(variants) == 1:
            prop.update(variants[0])
        prop.pop("default", None)
    schema["minProperties"] = 1


class UserUpdate(BaseModel):
    """A partial update: only the fields present change; at least one must be present."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_absent_not_null)

    # None only stands for "absent": an explicit null is refused by `_not_null`.
    name: Name | None = None
    email: Email | None = None

    @field_validator("name", "email", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("must not be null; leave the field out to keep its value")
        return value

    @model_validator(mode="after")
    def _something_to_change(self) -> UserUpdate:
        if not self.model_fields_set:
            raise ValueError("give at least one of: name, email")
        return self


class User(BaseModel):
    id: int
    name: str
    email: str
    created_at: Timestamp
    updated_at: Timestamp
    version: int


class UserPage(BaseModel):
    """One page of users in id order; pass `next_after` as `after` to get the next page (null: no more)."""

    items: list[User]
    next_after: int | None
