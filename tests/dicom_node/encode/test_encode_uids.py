from __future__ import annotations

import pytest

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
