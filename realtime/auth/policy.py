"""Row-level policies: which role may do what to which rows of a table, and which columns of them it sees.

A policy is data (AUTH_POLICY_FILE, TOML; docs/security.md is the reference):

    [[rule]]
    table = "users"
    roles = ["member"]
    actions = ["read", "update"]
    where = [{ column = "id", op = "eq", claim = "sub" }]
    columns = ["id", "name", "version", "created_at", "updated_at"]

Lifecycle:
    load     `load_policy()` reads the file and checks its shape (keys, actions, ops, values); a mistake raises
             PolicyError naming the rule's number and table
    bind     `PolicyFile.bind()` checks it against the database's streamed tables (every table streams, every
             column exists, `columns` keeps the primary key) and learns each column's JSON type
    grant    `Policy.grant(identity, table, action)` answers one caller: None when its role has no rule for the
             action, else a `Grant` whose conditions have the caller's claims filled in

A `Grant` is evaluated with the subscription filter language (filters.py), so the hub, snapshots, replays and REST
apply one meaning: a row is visible when any rule's conditions hold, and it shows the union of the columns of
the rules that hold. `Grant.where_sql()` renders the same test as SQL over the row's JSON, for REST lists.
"""

from __future__ import annotations

import re
import tomllib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from realtime.auth.tokens import Identity, claim_at
from realtime.stream.changes import Row, TableKey
from realtime.stream.filters import OPS, Condition, FilterError, RowFilter, compile_condition

ACTIONS = ("read", "insert", "update", "delete")
_RULE_KEYS = {"table", "roles", "actions", "where", "columns"}
# A claim is a single value (a string, number or boolean) or, for `in`, a list of them; `is` compares with a
# constant and takes none.
_CLAIM_OPS = tuple(op for op in OPS if op != "is")
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")

RowView = bool | frozenset[str]
"""What a grant shows of one row: False (nothing: the row is outside), True (every column), or these columns."""


POLICY_NEEDS_TOKENS = (
    "AUTH_POLICY_FILE needs a token key (AUTH_JWT_SECRET, AUTH_JWKS_URL or AUTH_PUBLIC_KEY_FILE): rules are chosen"
    " by the role a token carries"
)


class PolicyError(ValueError):
    """A policy file that cannot be applied; the message names the rule and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class RuleCondition:
    column: str
    op: str
    value: Any = None  # a literal, checked at load
    claim: tuple[str, ...] | None = None  # a dotted claim path whose value is taken from each caller's token

    def describe(self) -> str:
        operand = f"claim {'.'.join(self.claim)}" if self.claim is not None else repr(self.value)
        return f"{self.column} {self.op} {operand}"


@dataclass(frozen=True, slots=True)
class Rule:
    number: int  # 1-based position in the file, for messages
    table: TableKey
    roles: frozenset[str]
    actions: frozenset[str]
    where: tuple[RuleCondition, ...]
    columns: frozenset[str] | None  # None: every column

    @property
    def name(self) -> str:
        return f"rule {self.number} (table {self.table.wire_name!r})"


@dataclass(frozen=True, slots=True)
class TableSchema:
    """What binding needs to know of a streamed table: each column's JSON type and the primary key."""

    kinds: Mapping[str, str]  # column -> "num", "str", "bool" or "other" (arrays, json, composite)
    primary_key: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Branch:
    """One rule, bound to a caller: the rows it covers and the columns it shows of them (None: every column)."""

    filter: RowFilter
    columns: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class Grant:
    """What one caller may do with one action on one table: the OR of its rules' branches."""

    branches: tuple[Branch, ...]

    @property
    def restricts(self) -> bool:
        """False when some branch covers every row with every column: then the grant changes nothing."""
        return not any(not b.filter.conditions and b.columns is None for b in self.branches)

    def view(self, row: Row) -> RowView:
        shown: frozenset[str] | None = None
        for branch in self.branches:
            if branch.filter.matches(row):
                if branch.columns is None:
                    return True
                shown = branch.columns if shown is None else shown | branch.columns
        return False if shown is None else shown

    def covers(self, row: Row) -> bool:
        return any(branch.filter.matches(row) for branch in self.branches)

    @property
    def filterable_columns(self) -> frozenset[str] | None:
        """Columns a subscription or query may filter on: those every branch shows (None: any column), so a filter
        can never probe the value of a column the caller cannot read."""
        sets = [b.columns for b in self.branches if b.columns is not None]
        if not sets:
            return None
        return frozenset.intersection(*sets)

    @property
    def index_condition(self) -> Condition | None:
        """An `eq` the hub may index the subscription on: only a single branch can be indexed by one value."""
        if len(self.branches) != 1:
            return None
        return self.branches[0].filter.index_condition

    def where_sql(self, row: str, params: dict[str, Any]) -> str:
        """This grant's test as SQL over `row`, an expression of the row's JSON (jsonb) as the stream has it
        (realtime.utc_jsonb); values go into `params` as named parameters. Same meaning as `covers()`."""
        if not self.branches:
            return "false"
        alternatives = []
        for branch in self.branches:
            tests = [condition_sql(c, row, params) for c in branch.filter.conditions]
            alternatives.append("(" + " AND ".join(tests or ["true"]) + ")")
        return "(" + " OR ".join(alternatives) + ")"


def trim(row: Row, view: RowView) -> Row:
    """`row` with only the columns of `view` (which must not be False)."""
    if view is True:
        return row
    assert view is not False
    return {column: value for column, value in row.items() if column in view}


def condition_sql(condition: Condition, row: str, params: dict[str, Any]) -> str:
    """One condition as SQL over a jsonb row, with the filter language's typing: JSON-equal values are equal, an
    ordering holds only between two numbers or two strings (strings by code point, hence COLLATE "C"). Every
    parameter is cast, so the statement's types never depend on the driver's guesses."""

    def param(value: Any, sql_type: str) -> str:
        name = f"p{len(params)}"
        params[name] = value
        return f"CAST(:{name} AS {sql_type})"

    def jsonb(value: Any) -> str:
        return param(orjson.dumps(value).decode(), "jsonb")

    name = param(condition.column, "text")
    column = f"({row} -> {name})"
    op, value = condition.op, condition.value
    if op in ("eq", "is"):
        return f"({column} = {jsonb(value)})"
    if op == "neq":
        return f"({column} <> {jsonb(value)})"
    if op == "in":
        return f"({column} IN ({', '.join(jsonb(v) for v in value)}))"
    symbol = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">="}[op]
    if isinstance(value, str):
        text = f"({row} ->> {name})"
        return (
            f'(jsonb_typeof({column}) = \'string\' AND {text} COLLATE "C" {symbol} {param(value, "text")} COLLATE "C")'
        )
    # Two jsonb numbers compare as numbers.
    return f"(jsonb_typeof({column}) = 'number' AND {column} {symbol} {jsonb(value)})"


class Policy:
    """A policy bound to the database's tables: rules by (role, table, action), each column's JSON type known."""

    def __init__(self, rules: Iterable[Rule], schemas: Mapping[TableKey, TableSchema]) -> None:
        self.rules = tuple(rules)
        self._schemas = schemas
        self._rules: defaultdict[tuple[str, TableKey, str], list[Rule]] = defaultdict(list)
        for rule in self.rules:
            for role in rule.roles:
                for action in rule.actions:
                    self._rules[role, rule.table, action].append(rule)

    @property
    def tables(self) -> frozenset[TableKey]:
        return frozenset(self._schemas)

    def allows(self, role: str | None, table: TableKey, action: str) -> bool:
        return role is not None and (role, table, action) in self._rules

    def grant(self, identity: Identity | None, table: TableKey, action: str) -> Grant | None:
        """What `identity` may do on `table` with `action`; None when its role has no rule for it."""
        role = identity.role if identity is not None else None
        rules = self._rules.get((role, table, action)) if role is not None else None
        if not rules or identity is None:
            return None
        schema = self._schemas[table]
        branches = []
        for rule in rules:
            conditions = _bind(rule.where, identity, schema)
            if conditions is not None:
                branches.append(Branch(RowFilter(conditions), rule.columns))
        return Grant(tuple(branches))


def _bind(where: tuple[RuleCondition, ...], identity: Identity, schema: TableSchema) -> tuple[Condition, ...] | None:
    """The rule's conditions with the caller's claims filled in; None when a claim is missing or cannot be read as
    its column's type, so that the rule covers no row for this caller (never every row)."""
    conditions = []
    for condition in where:
        if condition.claim is None:
            conditions.append(Condition(condition.column, condition.op, condition.value))
            continue
        kind = schema.kinds[condition.column]
        claim = claim_at(identity.claims, condition.claim)
        if condition.op == "in":
            if not isinstance(claim, list):
                return None
            values = [v for v in (_as_kind(item, kind) for item in claim) if v is not _UNREADABLE]
            if not values:
                return None
            conditions.append(Condition(condition.column, "in", tuple(values)))
            continue
        value = _as_kind(claim, kind)
        if value is _UNREADABLE:
            return None
        conditions.append(Condition(condition.column, condition.op, value))
    return tuple(conditions)


_UNREADABLE = object()


def _as_kind(value: Any, kind: str) -> Any:
    """A claim's value as the column's JSON type: the subject "7" compares with the number 7, the number 7 with
    the string "7". Anything else (a missing claim, an object, "7a" for a number) is unreadable."""
    if kind == "num":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            return int(value) if _INTEGER.fullmatch(value) else float(value)
        return _UNREADABLE
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return _UNREADABLE
    if kind == "bool" and isinstance(value, bool):
        return value
    return _UNREADABLE


# --- the file ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyFile:
    """A policy as read from its file, shape checked, not yet checked against the database."""

    path: Path
    rules: tuple[Rule, ...]

    @property
    def tables(self) -> frozenset[TableKey]:
        return frozenset(rule.table for rule in self.rules)

    def bind(self, schemas: Mapping[TableKey, TableSchema | None]) -> Policy:
        """Check every rule against the tables' schemas (None: the table does not stream); PolicyError if not."""
        for rule in self.rules:
            schema = schemas.get(rule.table)
            if schema is None:
                raise self._error(rule, f"table {rule.table.wire_name!r} does not exist or does not stream")
            for condition in rule.where:
                if condition.column not in schema.kinds:
                    raise self._error(rule, f"unknown column {condition.column!r} in where")
                if condition.claim is not None and schema.kinds[condition.column] == "other":
                    raise self._error(
                        rule, f"column {condition.column!r} is not a number, string or boolean: no claim compares"
                    )
            if rule.columns is not None:
                unknown = sorted(rule.columns - set(schema.kinds))
                if unknown:
                    raise self._error(rule, f"unknown column(s) {', '.join(map(repr, unknown))} in columns")
                missing = [c for c in schema.primary_key if c not in rule.columns]
                if missing:
                    raise self._error(
                        rule,
                        f"columns must keep the primary key ({', '.join(map(repr, missing))}): rows are keyed by it",
                    )
        bound = {table: schema for table, schema in schemas.items() if schema is not None and table in self.tables}
        return Policy(self.rules, bound)

    def _error(self, rule: Rule, message: str) -> PolicyError:
        return PolicyError(f"{self.path}: {rule.name}: {message}")


def load_policy(path: Path) -> PolicyFile:
    """Read and shape-check a policy file; PolicyError (naming the rule and its table) when it is not valid."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PolicyError(f"{path}: cannot read the policy file: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise PolicyError(f"{path}: not valid TOML: {error}") from None
    unknown = sorted(set(document) - {"rule"})
    if unknown:
        raise PolicyError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; a policy is a list of [[rule]]")
    raw_rules = document.get("rule", [])
    if not isinstance(raw_rules, list):
        raise PolicyError(f"{path}: `rule` must be an array of tables, written [[rule]]")
    return PolicyFile(path, tuple(_rule(path, number, raw) for number, raw in enumerate(raw_rules, start=1)))


def _rule(path: Path, number: int, raw: Any) -> Rule:
    table_name = raw.get("table") if isinstance(raw, dict) else None
    where = f"{path}: rule {number}" + (f" (table {table_name!r})" if isinstance(table_name, str) else "")

    def bad(message: str) -> PolicyError:
        return PolicyError(f"{where}: {message}")

    if not isinstance(raw, dict):
        raise bad("must be a table of keys")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)}; a rule has {', '.join(sorted(_RULE_KEYS))}")
    if not isinstance(table_name, str) or not table_name or "\x00" in table_name:
        raise bad('`table` must name a streamed table, e.g. table = "users"')
    roles = _strings(raw.get("roles"), bad, "roles")
    actions = _strings(raw.get("actions"), bad, "actions")
    wrong = sorted(actions - set(ACTIONS))
    if wrong:
        raise bad(f"unknown action(s) {', '.join(map(repr, wrong))}; use {', '.join(ACTIONS)}")
    raw_where = raw.get("where", [])
    if not isinstance(raw_where, list):
        raise bad('`where` must be a list of conditions like { column = "id", op = "eq", claim = "sub" }')
    conditions = tuple(_condition(position, item, bad) for position, item in enumerate(raw_where))
    columns = _strings(raw["columns"], bad, "columns") if "columns" in raw else None
    return Rule(number, TableKey.parse(table_name), roles, actions, conditions, columns)


def _strings(value: Any, bad: Any, key: str) -> frozenset[str]:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
        raise bad(f"`{key}` must be a non-empty list of strings")
    return frozenset(value)


def _condition(position: int, raw: Any, bad: Any) -> RuleCondition:
    label = f"where[{position}]"
    if not isinstance(raw, dict) or not {"column", "op"} <= set(raw) or len(set(raw) & {"value", "claim"}) != 1:
        raise bad(f"{label} must have column, op, and exactly one of value or claim")
    extra = sorted(set(raw) - {"column", "op", "value", "claim"})
    if extra:
        raise bad(f"{label}: unknown key(s) {', '.join(extra)}")
    column, op = raw["column"], raw["op"]
    if not isinstance(column, str) or not column:
        raise bad(f"{label}.column must be a column name")
    if not isinstance(op, str) or op not in OPS:
        raise bad(f"{label}: unknown op {op!r}; use one of {', '.join(OPS)}")
    if "claim" in raw:
        claim = raw["claim"]
        if not isinstance(claim, str) or not claim or any(not part for part in claim.split(".")):
            raise bad(f'{label}.claim must be a claim name or dotted path, e.g. "sub" or "app_metadata.team"')
        if op not in _CLAIM_OPS:
            raise bad(f"{label}: op {op!r} compares with a constant; use value, not claim")
        return RuleCondition(column, op, claim=tuple(claim.split(".")))
    try:
        checked = compile_condition(column, op, raw["value"])
    except FilterError as error:
        raise bad(f"{label}: {error}") from None
    return RuleCondition(column, op, value=checked.value)


# --- the database -----------------------------------------------------------------------------------------

_COLUMN_KINDS = """
    SELECT a.attname,
           CASE WHEN t.typcategory = 'N' THEN 'num'
                WHEN t.typcategory = 'B' THEN 'bool'
                WHEN t.typcategory IN ('A', 'C') OR t.typname IN ('json', 'jsonb') THEN 'other'
                ELSE 'str' END,
           array_position(i.indkey::int2[], a.attnum)
    FROM realtime.streamed_tables s
    JOIN pg_namespace n ON n.nspname = s.table_schema
    JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.table_name
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    JOIN pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
    WHERE s.table_schema = $1 AND s.table_name = $2
      AND EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = c.oid AND g.tgname = 'realtime_capture')
"""


async def read_schemas(conn: asyncpg.Connection, tables: Iterable[TableKey]) -> dict[TableKey, TableSchema | None]:
    """The schema of each table that streams; None for one that does not exist or does not stream."""
    schemas: dict[TableKey, TableSchema | None] = {}
    for table in tables:
        records = await conn.fetch(_COLUMN_KINDS, table.schema, table.name)
        if not records:
            schemas[table] = None
            continue
        key = tuple(r[0] for r in sorted((r for r in records if r[2] is not None), key=lambda r: r[2]))
        schemas[table] = TableSchema({r[0]: r[1] for r in records}, key)
    return schemas


async def load_bound_policy(path: Path, conn: asyncpg.Connection) -> Policy:
    """Load the file and check it against the database `conn` is connected to."""
    policy_file = load_policy(path)
    return policy_file.bind(await read_schemas(conn, policy_file.tables))


def describe(policy: Policy) -> str:
    """The effective rules per role and table, as `realtime policy check` prints them."""
    lines = []
    by_role: defaultdict[str, list[Rule]] = defaultdict(list)
    for rule in policy.rules:
        for role in rule.roles:
            by_role[role].append(rule)
    for role in sorted(by_role):
        lines.append(f"role {role}:")
        for rule in sorted(by_role[role], key=lambda r: (r.table, r.number)):
            actions = ", ".join(a for a in ACTIONS if a in rule.actions)
            rows = " AND ".join(c.describe() for c in rule.where) or "every row"
            columns = ", ".join(sorted(rule.columns)) if rule.columns is not None else "every column"
            lines.append(f"  {rule.table.wire_name}: {actions} where {rows}; columns: {columns}  [rule {rule.number}]")
    return "\n".join(lines)
