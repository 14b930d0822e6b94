"""values.yaml and values.schema.json stay in step: every key described, typed and defaulted, every
key commented, the schema strict."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml
from chartlib import CHART, case_name, ci_values_files

pytestmark = pytest.mark.chart

VALUES_FILE = CHART / "values.yaml"
SCHEMA_FILE = CHART / "values.schema.json"


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(VALUES_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    return loaded


def value_paths(values: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every key of values.yaml as a tuple of keys (keys may hold dots: nvidia.com/gpu.present)."""
    if isinstance(values, dict):
        for k, v in values.items():
            path = (*prefix, k)
            yield path, v
            yield from value_paths(v, path)


def schema_node(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """The schema of a key path, following `properties` only (a free-form map does not count)."""
    node: dict[str, Any] | None = schema
    for key in path:
        if node is None:
            return None
        node = node.get("properties", {}).get(key)
    return node


def missing_from_schema(values: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Keys of values that the schema does not declare. Keys inside a declared free-form map (such
    as nodeSelector or evaluators.files, whose schema has no `properties`) are the map's content."""
    missing = []
    for path, _ in value_paths(values):
        parent = schema_node(schema, path[:-1])
        if parent is not None and "properties" not in parent:
            continue  # inside a free-form map
        if schema_node(schema, path) is None:
            missing.append(".".join(path))
    return missing


def schema_properties(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    for k, sub in node.get("properties", {}).items():
        p = f"{path}.{k}" if path else k
        yield p, sub
        yield from schema_properties(sub, p)
    items = node.get("items")
    if isinstance(items, dict):
        yield from schema_properties(items, f"{path}[]")


def object_schemas(node: Any, path: str = "$") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield path, node
        for k, v in node.items():
            if k in ("default", "examples"):
                continue
            yield from object_schemas(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from object_schemas(v, f"{path}[{i}]")


def test_every_values_key_is_in_the_schema(values: dict[str, Any], schema: dict[str, Any]) -> None:
    assert missing_from_schema(values, schema) == []


def test_a_key_missing_from_the_schema_is_detected(values: dict[str, Any], schema: dict[str, Any]) -> None:
    doctored = json.loads(json.dumps(values))
    doctored["eval"]["newKnob"] = 1
    doctored["watch"]["livenessProbe"]["successThreshold"] = 1
    assert missing_from_schema(doctored, schema) == ["watch.livenessProbe.successThreshold", "eval.newKnob"]


def test_every_schema_property_exists_in_values(values: dict[str, Any], schema: dict[str, Any]) -> None:
    paths = {".".join(p) for p, _ in value_paths(values)}
    declared = {p for p, _ in schema_properties(schema) if "[]" not in p and p != "global"}
    assert declared - paths == set()


def test_every_property_has_a_description_and_the_values_default(values: dict[str, Any], schema: dict[str, Any]) -> None:
    flat = {".".join(p): v for p, v in value_paths(values)}
    problems = []
    for path, node in schema_properties(schema):
        if not node.get("description"):
            problems.append(f"{path}: no description")
        if "[]" in path:
            continue  # fields of list items have no default in values.yaml
        if "default" not in node:
            problems.append(f"{path}: no default")
        elif path in flat and node["default"] != flat[path]:
            problems.append(f"{path}: schema default {node['default']!r} != values.yaml {flat[path]!r}")
    assert problems == []


def test_every_object_states_whether_it_takes_other_keys(schema: dict[str, Any]) -> None:
    loose = [p for p, node in object_schemas(schema) if "additionalProperties" not in node]
    assert loose == []
    assert schema["additionalProperties"] is False


def test_objects_with_declared_keys_are_strict_except_kubernetes_passthroughs(schema: dict[str, Any]) -> None:
    """Chart settings refuse unknown keys; only Kubernetes objects passed through as-is accept them."""
    passthrough = {"podSecurityContext", "securityContext"}
    for path, node in schema_properties(schema):
        if "properties" in node and node.get("additionalProperties") is not False:
            assert passthrough & set(path.split(".")), f"{path} accepts unknown keys"


def test_schema_is_valid_and_accepts_the_defaults_and_every_case(values: dict[str, Any], schema: dict[str, Any]) -> None:
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    assert list(validator.iter_errors(values)) == []
    for path in ci_values_files():
        case_values = yaml.safe_load(path.read_text()) or {}
        errors = [e.message for e in validator.iter_errors(_merge(values, case_values))]
        assert errors == [], case_name(path)


def _merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(base))  # a deep copy
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


KEY_LINE = re.compile(r"^(\s*)([A-Za-z0-9_./-]+):(\s|$)")


def uncommented_keys(text: str) -> list[str]:
    """Keys of a values file whose line is neither preceded by a comment line (at any indentation)
    nor ends in one. Keys of list items (`- key: ...` and the lines under it) are the list's content."""
    missing = []
    previous = ""
    item_indent: int | None = None  # indentation of the "- " of the list item we are in
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if item_indent is not None and indent <= item_indent and not line.lstrip().startswith("- "):
            item_indent = None
        if line.lstrip().startswith("- "):
            item_indent = indent
        m = KEY_LINE.match(line)
        if m and item_indent is None and not previous.lstrip().startswith("#") and " # " not in line:
            missing.append(f"{number}: {line.strip()}")
        previous = line
    return missing


def test_every_values_key_has_a_comment() -> None:
    assert uncommented_keys(VALUES_FILE.read_text()) == []


def test_an_uncommented_key_is_detected() -> None:
    text = (
        "# The image.\nimage:\n  # Repository.\n  repository: a\n  tag: b\n"
        "# Tolerations.\ntolerations:\n  - key: a\n    operator: Exists\nafter: 1\n"
    )
    assert uncommented_keys(text) == ["5: tag: b", "10: after: 1"]
