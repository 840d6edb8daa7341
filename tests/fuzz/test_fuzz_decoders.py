"""Hostile records: every consumer's decoder refuses garbage with InvalidRecord and nothing else."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shipline import codec
from shipline.envelope import wrap
from shipline.messages import REGISTRY
from tests.unit.test_codec import sample

pytestmark = pytest.mark.unit

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=15,
)


def valid_doc(type_name: str) -> dict:
    return json.loads(codec.encode(wrap(sample(REGISTRY[type_name]), source="fuzz", sequence=1)))  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=2048))
def test_random_bytes(raw: bytes) -> None:
    with pytest.raises(codec.InvalidRecord):
        codec.decode(raw)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(type_name=st.sampled_from(sorted(REGISTRY)), path=st.lists(st.text(max_size=12), min_size=1, max_size=2),
       value=json_values, drop=st.booleans())
def test_mutated_valid_records(type_name: str, path: list[str], value: object, drop: bool) -> None:
    doc = valid_doc(type_name)
    target = doc if len(path) == 1 else doc.get("data", {})
    key = path[-1]
    if drop and key in target:
        del target[key]
    else:
        target[key] = value
    raw = json.dumps(doc, allow_nan=True).encode()
    try:
        env = codec.decode(raw)
    except codec.InvalidRecord as exc:
        assert exc.reason
        return
    # accepted: then it must survive a re-encode and the strict schema check
    assert codec.decode(codec.encode(env), strict=True) == env
