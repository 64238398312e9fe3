from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydicom.uid import UID

from dicom_node.encode.uids import Provenance, UIDRootError, canonical_params, derive_uid
from dicom_node.storage import is_valid_uid


def test_derived_uids_are_deterministic_valid_and_distinct() -> None:
    first = derive_uid(None, "series", "1.2.3", "kmeans", "1.0.0", "abc")
    assert first == derive_uid(None, "series", "1.2.3", "kmeans", "1.0.0", "abc")
    assert first.startswith("2.25.") and is_valid_uid(first)
    assert first != derive_uid(None, "series", "1.2.3", "kmeans", "1.0.1", "abc")
    assert first != derive_uid(None, "series", "1.2.4", "kmeans", "1.0.0", "abc")


def test_uid_root_is_used_and_checked() -> None:
    uid = derive_uid("1.2.826.0.1.3680043.10.999", "x")
    assert uid.startswith("1.2.826.0.1.3680043.10.999.") and is_valid_uid(uid)
    assert len(uid) <= 64
    assert derive_uid("2.25", "x") == derive_uid(None, "x")
    for bad in ("1.2.abc", "1.02.3", "1." * 30):
        with pytest.raises(UIDRootError):
            derive_uid(bad, "x")


def test_params_and_upstream_change_the_uids() -> None:
    base = Provenance("kmeans", "1.0.0", "cluster", {"k": 3})
    same = Provenance("kmeans", "1.0.0", "cluster", {"k": 3})
    other = Provenance("kmeans", "1.0.0", "cluster", {"k": 4})
    after = Provenance("kmeans", "1.0.0", "cluster", {"k": 3}, upstream=("gaussian@1.0.0:{}",))
    uids = {p.series_uid("1.2.3", "seg") for p in (base, other, after)}
    assert len(uids) == 3
    assert base.series_uid("1.2.3", "seg") == same.series_uid("1.2.3", "seg")
    assert base.instance_uid("1.2.3", "seg") != base.series_uid("1.2.3", "seg")
    assert base.instance_uid("1.2.3", "derived", 0, 1) != base.instance_uid(
        "1.2.3", "derived", 0, 2
    )
    assert canonical_params({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert base.parameters_text() == {"k": "3"}
    with pytest.raises(ValueError, match="name and version"):
        Provenance("", "1.0.0")


ROOT = "1.2.826.0.1.3680043.10.999"


@pytest.mark.parametrize("root", [None, ROOT])
def test_parts_that_join_to_the_same_text_give_different_uids(root: str | None) -> None:
    provenance = Provenance("kmeans", "1.0.0", "cluster", uid_root=root)
    assert provenance.instance_uid("1.2.3", "derived", 1, 23) != provenance.instance_uid(
        "1.2.3", "derived", 12, 3
    )
    assert derive_uid(root, "ab", "c") != derive_uid(root, "a", "bc")
    assert derive_uid(root, 1) != derive_uid(root, "1")


# Small alphabets and numbers, so that different tuples often join to the same text.
uid_parts = st.lists(
    st.one_of(st.text(alphabet="12.", max_size=3), st.integers(0, 40)), max_size=4
).map(tuple)
roots = st.lists(  # at most 5 components of at most 6 digits: within MAX_ROOT_LENGTH
    st.one_of(st.just("0"), st.integers(1, 10**5).map(str)), min_size=1, max_size=5
).map(".".join)


@given(first=uid_parts, second=uid_parts, root=st.one_of(st.none(), roots))
def test_distinct_parts_give_distinct_valid_uids(
    first: tuple[str | int, ...], second: tuple[str | int, ...], root: str | None
) -> None:
    assume(first != second)
    a, b = derive_uid(root, *first), derive_uid(root, *second)
    assert a != b
    for uid in (a, b):
        assert UID(uid).is_valid
        assert len(uid) == 64 or root is None
        assert uid.startswith(f"{root or '2.25'}.")
