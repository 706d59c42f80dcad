"""Shapes: one definition gives the check (errors name the field and say what it must be) and
the JSON schema."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pytest

from plumbing.shapes import Rule, ShapeError, parse, schema


@dataclass(frozen=True)
class Inner:
    count: Annotated[int, Rule(minimum=1, maximum=8)]
    tags: Annotated[tuple[str, ...], Rule(max_items=2)] = ()


@dataclass(frozen=True)
class Outer:
    name: Annotated[str, Rule(pattern=r"[a-z]+", must="a lower-case word", code="invalid_name")]
    size: Annotated[float, Rule(minimum=0.5)] = 1.0
    kind: Literal["a", "b"] = "a"
    flag: bool = False
    note: str | None = None
    inner: Inner | None = None
    labels: dict[str, str] = field(default_factory=dict)
    extra: Any = None


def test_a_good_value_reads_as_the_shape() -> None:
    got = parse(Outer, {"name": "web", "size": 2, "kind": "b", "flag": True, "note": None,
                        "inner": {"count": 3, "tags": ["x"]}, "labels": {"k": "v"},
                        "extra": [1], "unknown": "ignored"})
    assert got == Outer("web", 2.0, "b", True, None, Inner(3, ("x",)), {"k": "v"}, [1])
    assert isinstance(got.size, float)
    assert parse(Outer, {"name": "web"}) == Outer("web")


@pytest.mark.parametrize(("value", "message", "code"), [
    (None, "body must be a JSON object", ""),
    ([], "body must be a JSON object", ""),
    ({}, "name must be a lower-case word", "invalid_name"),  # missing: what it must be
    ({"name": "Web"}, "name must be a lower-case word", "invalid_name"),
    ({"name": 7}, "name must be a lower-case word", "invalid_name"),
    ({"name": "web", "size": 0.1}, "size must be a number of at least 0.5", ""),
    ({"name": "web", "size": "2"}, "size must be a number of at least 0.5", ""),
    ({"name": "web", "size": float("nan")}, "size must be a number of at least 0.5", ""),
    ({"name": "web", "kind": "c"}, "kind must be one of a, b", ""),
    ({"name": "web", "flag": 1}, "flag must be true or false", ""),
    ({"name": "web", "note": 5}, "note must be a string or null", ""),
    ({"name": "web", "inner": []}, "inner must be a JSON object or null", ""),
    ({"name": "web", "inner": {}}, "inner.count must be an integer from 1 to 8", ""),
    ({"name": "web", "inner": {"count": True}}, "inner.count must be an integer from 1 to 8",
     ""),
    ({"name": "web", "inner": {"count": 9}}, "inner.count must be an integer from 1 to 8", ""),
    ({"name": "web", "inner": {"count": 1, "tags": ["a", 2]}},
     "inner.tags[1] must be a string", ""),
    ({"name": "web", "inner": {"count": 1, "tags": ["a", "b", "c"]}},
     "inner.tags must be a list of at most 2 items", ""),
    ({"name": "web", "labels": {"k": 1}}, "labels.k must be a string", ""),
])
def test_a_bad_value_names_the_field_and_what_it_must_be(value: Any, message: str,
                                                         code: str) -> None:
    with pytest.raises(ShapeError) as caught:
        parse(Outer, value)
    assert str(caught.value) == message
    assert caught.value.code == code


def test_the_schema_comes_from_the_same_definition() -> None:
    doc = schema(Outer)
    assert doc["type"] == "object"
    assert doc["required"] == ["name"]
    props = doc["properties"]
    assert props["name"] == {"type": "string", "pattern": "^(?:[a-z]+)$"}
    assert props["size"] == {"type": "number", "minimum": 0.5, "default": 1.0}
    assert props["kind"] == {"type": "string", "enum": ["a", "b"], "default": "a"}
    assert props["flag"] == {"type": "boolean", "default": False}
    assert props["note"] == {"type": "string", "nullable": True}
    assert props["inner"]["nullable"] is True
    assert props["inner"]["required"] == ["count"]
    assert props["inner"]["properties"]["count"] == {"type": "integer", "minimum": 1,
                                                     "maximum": 8}
    assert props["inner"]["properties"]["tags"] == {
        "type": "array", "items": {"type": "string"}, "maxItems": 2, "default": []}
    assert props["labels"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert props["extra"] == {}


@dataclass(frozen=True)
class WithNested:
    inner: Inner = Inner(1)


def test_a_nested_shapes_default_leaves_its_own_defaults_to_its_schema() -> None:
    doc = schema(WithNested)
    assert "default" not in doc["properties"]["inner"]
    assert json.loads(json.dumps(doc)) == doc  # plain JSON, as openapi.json serves it
    assert parse(WithNested, {}) == WithNested(Inner(1))
