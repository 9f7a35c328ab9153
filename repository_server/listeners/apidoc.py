"""The pieces of an OpenAPI 3.1 document that both descriptions use (the read listeners',
`web/openapi.py`, and the lodging listener's, `lodge/openapi.py`). No I/O."""

from __future__ import annotations

from typing import Any

JSON = "application/json"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_answer(description: str, schema: str) -> dict[str, Any]:
    """A response whose body is the JSON object `components.schemas[schema]`."""
    return {"description": description, "content": {JSON: {"schema": ref(schema)}}}


def path_param(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "minLength": 1, **schema}}


def query_param(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "string", **schema}}
