"""DAG-time choice of the job that fills an extraction directory (`dropinf.pipeline.serving`)."""
from __future__ import annotations

import json

import pytest

from dropinf.pipeline import serving
from dropinf.pipeline.serving import IDENTITY, NESTED, PASS, Route


def test_nesting_compressors_agree_with_the_registry():
    from dropinf.compressors import COMPRESSORS

    assert set(serving.NESTS_IN_R) == {name for name, cls in COMPRESSORS.items() if cls.nests_in_r}


def _manifest(directory, **fields):
    directory.mkdir(parents=True, exist_ok=True)
    m = {"status": "complete", "fingerprint": {"device_type": "cpu"}, "sliced_from": None, "served_from": None,
         **fields}
    (directory / "manifest.json").write_text(json.dumps(m))
    return m


class _Identity:
    """The identity callable: counts its calls (it may wait for a checkpoint)."""

    def __init__(self, manifest):
        self.manifest, self.calls = manifest, 0

    def __call__(self):
        self.calls += 1
        return self.manifest


def _route(tmp_path, comp, r, *, rs=(16, 64), nest=True, from_identity=True, identity=None, device="auto"):
    identity = identity if identity is not None else _Identity(None)
    return serving.route(compressor=comp, r=r, grads=str(tmp_path), rs=list(rs), nest=nest,
                         from_identity=from_identity, identity=identity, device=device)


def test_fresh_routes(tmp_path):
    stored = _Identity({"status": "complete", "fingerprint": {"device_type": "cpu"}})
    ident = str(tmp_path / "identity" / "full")
    # a smaller r of a nesting compressor: sliced from the largest configured r, identity not asked
    assert _route(tmp_path, "dropout", 16, identity=stored) == Route(NESTED, f"{tmp_path}/dropout/r64")
    assert stored.calls == 0
    assert _route(tmp_path, "dropout", 64, identity=stored) == Route(IDENTITY, ident)
    assert _route(tmp_path, "sjlt", 16, identity=stored) == Route(IDENTITY, ident)
    assert _route(tmp_path, "identity", None, identity=stored) == Route(PASS)
    assert _route(tmp_path, "gaussian", 16, nest=False, identity=stored) == Route(IDENTITY, ident)
    assert _route(tmp_path, "gaussian", 16, nest=False, from_identity=False, identity=stored) == Route(PASS)
    # no identity in the run, or it stored nothing, or on another device type: a pass
    assert _route(tmp_path, "logra", 16) == Route(PASS)
    skipped = _Identity({"status": "skipped", "fingerprint": {"device_type": "cpu"}})
    assert _route(tmp_path, "logra", 16, identity=skipped) == Route(PASS)
    assert _route(tmp_path, "logra", 16, identity=stored, device="cuda:1") == Route(PASS)
    assert _route(tmp_path, "logra", 16, identity=stored, device="cpu") == Route(IDENTITY, ident)


def test_finished_extractions_keep_their_route(tmp_path):
    """Adding r128 after r16 was sliced from r64 keeps r16's source; a pass stays a pass."""
    _manifest(tmp_path / "dropout" / "r64", served_from=str(tmp_path / "identity" / "full"))
    _manifest(tmp_path / "identity" / "full")
    _manifest(tmp_path / "dropout" / "r16", sliced_from=str(tmp_path / "dropout" / "r64"))
    _manifest(tmp_path / "sjlt" / "r16")
    rs = (16, 64, 128)
    assert _route(tmp_path, "dropout", 16, rs=rs) == Route(NESTED, str(tmp_path / "dropout" / "r64"))
    assert _route(tmp_path, "dropout", 64, rs=rs) == Route(IDENTITY, str(tmp_path / "identity" / "full"))
    stored = _Identity({"status": "complete", "fingerprint": {"device_type": "cpu"}})
    assert _route(tmp_path, "sjlt", 16, rs=rs, identity=stored) == Route(PASS) and stored.calls == 0
    assert _route(tmp_path, "dropout", 32, rs=rs) == Route(NESTED, f"{tmp_path}/dropout/r128")
    # a switch turned off applies to what is made afresh; a source gone: decided afresh
    assert _route(tmp_path, "dropout", 16, rs=rs, nest=False) == Route(NESTED, str(tmp_path / "dropout" / "r64"))
    assert _route(tmp_path, "dropout", 32, rs=rs, nest=False, from_identity=False) == Route(PASS)
    (tmp_path / "dropout" / "r64" / "manifest.json").unlink()
    assert _route(tmp_path, "dropout", 16, rs=rs) == Route(NESTED, f"{tmp_path}/dropout/r128")


@pytest.mark.parametrize("route,shards,names", [
    (Route(PASS), 2, ["pass-0of2.json", "pass-1of2.json"]),
    (Route(NESTED, "g/dropout/r64"), 2, ["from-r64-0of1.json"]),
    (Route(IDENTITY, "g/identity/full"), 1, ["from-identity-0of1.json"])])
def test_part_records_match_the_stage_names(tmp_path, route, shards, names):
    from dropinf.pipeline.sharding import part_path

    parts = route.parts("g/x/r8", shards)
    assert [p.rsplit("/", 1)[1] for p in parts] == names
    n = len(parts)
    assert parts == [str(part_path("g/x/r8", kind=route.part_kind(), shard=k, shards=n)) for k in range(n)]
