"""Property-based fuzzing of what parses client input: only domain errors, never a crash."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from neurotrale_twisted.core.annotations.records import parse_records, validate_records
from neurotrale_twisted.core.errors import BadRequest
from neurotrale_twisted.web.negotiation import Unsatisfiable, choose_encoding, single_range

VIEWER_FIELDS = ("id", "type", "point", "points", "anntype", "reviewed", "visited", "length")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)
triples = st.lists(
    st.one_of(st.integers(-5, 5), st.floats(), st.none(), st.text(max_size=2)),
    min_size=2,
    max_size=4,
)
record_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=4), st.none(), st.integers()),
        "type": st.sampled_from(["point", "Polygon", "LINESTRING", "line", "circle", "", None]),
        "point": triples,
        "points": st.lists(triples, max_size=3),
        "anntype": st.one_of(st.text(max_size=5), st.none()),
        "reviewed": st.one_of(st.booleans(), st.none(), st.integers(0, 1)),
        "visited": st.one_of(st.booleans(), st.none()),
        "length": st.one_of(st.floats(), st.none(), st.text(max_size=2)),
        "extra": json_values,
    },
)


def check_accepted(records: list[dict[str, Any]]) -> None:
    """What every accepted file guarantees the viewer."""
    ids = [r["id"] for r in records]
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == len(ids)
    for record in records:
        assert all(record.get(f, 0) is not None for f in VIEWER_FIELDS)
        for triple in [record["point"]] if "point" in record else record.get("points", []):
            assert len(triple) == 3
            assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in triple)
            assert all(math.isfinite(v) for v in triple)


@settings(max_examples=400, deadline=None)
@given(st.one_of(json_values, st.lists(record_like, max_size=5)))
def test_validator_accepts_only_what_the_viewer_can_read(data: Any) -> None:
    try:
        records = validate_records(data)
    except BadRequest as e:
        assert e.message
        return
    check_accepted(records)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=200)
    | st.lists(record_like, max_size=4).map(lambda v: json.dumps(v, allow_nan=True).encode())
)
def test_parser_raises_only_bad_request(body: bytes) -> None:
    try:
        records = parse_records(body)
    except BadRequest:
        return
    check_accepted(records)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60), st.integers(0, 10**9))
def test_header_parsers_never_crash(header: bytes, length: int) -> None:
    assert choose_encoding(header) in (None, "zstd", "gzip")
    try:
        span = single_range(header, length)
    except Unsatisfiable:
        return
    if span is not None:
        assert 0 <= span[0] < span[1] <= length
