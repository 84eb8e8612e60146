"""Schemathesis hooks for ``tests/test_openapi.py``: the rules JSON Schema cannot state.

Loaded by the ``st`` process through ``SCHEMATHESIS_HOOKS=tests.schemathesis_hooks``.
"""

from __future__ import annotations

from typing import Any

import schemathesis

Case = schemathesis.Case[Any]

#: How the server's messages about a refused request body begin (annotations/records.py).
BODY_MESSAGES = (
    "record",
    "invalid JSON",
    "an annotation file",
    "a PATCH body",
    "the records",
    "the id parameter",
)


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: Case) -> Case:
    """Make generated writes keep two rules a schema cannot express: record ids are unique
    within a file, and a PATCH's ``?id=`` names the body's record when both are given."""
    body: Any = case.body
    if case.method == "PUT" and isinstance(body, list):
        seen: set[str] = set()
        for index, record in enumerate(body):
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                if record["id"] in seen:
                    record["id"] = f"{record['id']}#{index}"
                seen.add(record["id"])
    if case.method == "PATCH" and isinstance(body, dict) and isinstance(body.get("id"), str):
        query = case.query or {}
        if query.get("id"):
            query["id"] = body["id"]
    return case


@schemathesis.check
def schema_valid_bodies_are_accepted(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case
) -> bool | None:
    """A write whose body keeps to the schema is never refused for its body.

    The configuration lets writes answer 400 for what a schema cannot know (a new block's
    point outside the volume); this check keeps the record schema and the server's record
    validation telling the same story.
    """
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    if case.method not in ("PUT", "PATCH"):
        return None
    message = str(response.json().get("error", ""))
    if message.startswith(BODY_MESSAGES):
        raise AssertionError(f"a body that keeps to the schema was refused: {message}")
    return None
