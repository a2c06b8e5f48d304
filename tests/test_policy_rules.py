"""Row-level policy rules as pure logic: binding claims to conditions, how rules add up, what a grant shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from realtime.auth.policy import Grant, Policy, TableSchema, load_policy, trim
from realtime.auth.tokens import Identity
from realtime.stream.changes import TableKey

USERS = TableKey("public", "users")
SCHEMA = TableSchema(
    {"id": "num", "name": "str", "email": "str", "team": "str", "active": "bool", "tags": "other"}, ("id",)
)


def bound(tmp_path: Path, text: str) -> Policy:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return load_policy(path).bind({USERS: SCHEMA})


def grant_for(policy: Policy, role: str, action: str = "read", **claims: Any) -> Grant | None:
    return policy.grant(Identity("7", role, 0, {"sub": "7", **claims}), USERS, action)


MEMBER = """
[[rule]]
table = "users"
roles = ["member"]
actions = ["read"]
where = [{ column = "id", op = "eq", claim = "sub" }]
columns = ["id", "name"]
"""


def test_a_string_subject_matches_a_numeric_key_and_is_indexed(tmp_path: Path) -> None:
    grant = grant_for(bound(tmp_path, MEMBER), "member")
    assert grant is not None
    assert grant.restricts
    assert grant.view({"id": 7, "name": "Ada", "email": "a@x"}) == frozenset({"id", "name"})
    assert grant.view({"id": 8, "name": "Bob", "email": "b@x"}) is False
    condition = grant.index_condition
    assert condition is not None
    assert (condition.column, condition.op, condition.value) == ("id", "eq", 7)


@pytest.mark.parametrize("claims", [{"sub": "seven"}, {"sub": {"id": 7}}, {"sub": True}])
def test_an_unreadable_claim_covers_no_row(tmp_path: Path, claims: dict[str, Any]) -> None:
    policy = bound(tmp_path, MEMBER)
    grant = policy.grant(Identity("x", "member", 0, claims), USERS, "read")
    assert grant is not None
    assert grant.branches == ()
    assert grant.view({"id": 7}) is False


def test_a_role_without_a_rule_for_the_action_gets_no_grant(tmp_path: Path) -> None:
    policy = bound(tmp_path, MEMBER)
    assert grant_for(policy, "member", "delete") is None
    assert grant_for(policy, "stranger") is None
    assert policy.grant(Identity("7", None, 0, {"sub": "7"}), USERS, "read") is None


def test_rules_add_up_and_a_row_shows_the_union_of_the_columns_of_the_rules_that_hold(tmp_path: Path) -> None:
    policy = bound(
        tmp_path,
        MEMBER
        + """
[[rule]]
table = "users"
roles = ["member"]
actions = ["read"]
where = [{ column = "team", op = "in", claim = "org.teams" }, { column = "active", op = "is", value = true }]
columns = ["id", "team"]
""",
    )
    grant = grant_for(policy, "member", org={"teams": ["red", 5, None]})
    assert grant is not None
    assert grant.index_condition is None
    own = {"id": 7, "name": "Ada", "team": "red", "active": True}
    assert grant.view(own) == frozenset({"id", "name", "team"})
    assert grant.view({"id": 9, "name": "Cy", "team": "5", "active": True}) == frozenset({"id", "team"})
    assert grant.view({"id": 9, "name": "Cy", "team": "red", "active": False}) is False
    assert grant.filterable_columns == frozenset({"id"})
    assert trim(own, frozenset({"id", "team"})) == {"id": 7, "team": "red"}


def test_a_rule_over_every_row_and_column_does_not_restrict(tmp_path: Path) -> None:
    policy = bound(tmp_path, MEMBER + '\n[[rule]]\ntable = "users"\nroles = ["member"]\nactions = ["read"]\n')
    grant = grant_for(policy, "member")
    assert grant is not None
    assert not grant.restricts


def test_a_claim_cannot_be_compared_with_a_json_column(tmp_path: Path) -> None:
    text = MEMBER.replace('column = "id", op = "eq", claim = "sub"', 'column = "tags", op = "eq", claim = "sub"')
    with pytest.raises(ValueError, match=r"rule 1 \(table 'users'\): column 'tags' is not a number"):
        bound(tmp_path, text)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ('{ column = "id", op = "eq" }', "exactly one of value or claim"),
        ('{ column = "id", op = "eq", value = 1, claim = "sub" }', "exactly one of value or claim"),
        ('{ column = "id", op = "is", claim = "sub" }', "op 'is' compares with a constant"),
        ('{ column = "id", op = "in", value = [] }', "non-empty list"),
        ('{ column = "id", op = "eq", claim = "a..b" }', "claim name or dotted path"),
        ('{ column = "id", op = "eq", value = 1, extra = 2 }', "unknown key(s) extra"),
    ],
)
def test_a_malformed_condition_names_its_rule_and_position(tmp_path: Path, where: str, message: str) -> None:
    text = MEMBER.replace('{ column = "id", op = "eq", claim = "sub" }', where)
    with pytest.raises(ValueError, match=r"rule 1 \(table 'users'\): where\[0\]") as error:
        bound(tmp_path, text)
    assert message in str(error.value)
