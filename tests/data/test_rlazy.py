"""The R lazy-load reader on a synthetic database using every chunk encoding R writes."""
import bz2
import gzip
import lzma
import struct
import zlib

import numpy as np
import pytest

from dropinf.errors import DropinfError

rdata = pytest.importorskip("rdata")


def _rds_bytes(tmp_path, obj, name):
    path = tmp_path / f"{name}.rds"
    rdata.write_rds(path, obj, compression=None)
    return path.read_bytes()


def _chunk(raw: bytes, kind: str) -> bytes:
    head = struct.pack(">I", len(raw))
    if kind == "Z":
        return head + b"Z" + lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    if kind == "2":
        return head + b"2" + bz2.compress(raw)
    if kind == "1":
        return head + b"1" + zlib.compress(raw)
    if kind == "0":
        return head + b"0" + raw
    return head + zlib.compress(raw)  # R's default: no type byte


@pytest.fixture
def lazydb(tmp_path):
    objects = {
        "lines_Z": (np.array(["EMMA", "", "By Jane Austen"], dtype=object), "Z"),
        "lines_2": (np.array(["two"], dtype=object), "2"),
        "lines_1": (np.array(["one", "uno"], dtype=object), "1"),
        "ints_0": (np.array([1, 2, 3], dtype=np.int32), "0"),
        "ints_plain": (np.array([7, 8], dtype=np.int32), ""),
    }
    rdb, where = b"", {}
    for name, (obj, kind) in objects.items():
        blob = _chunk(_rds_bytes(tmp_path, obj, name), kind)
        where[name] = np.array([len(rdb), len(blob)], dtype=np.int32)
        rdb += blob
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "Rdata.rdb").write_bytes(rdb)
    index = {"variables": where, "references": {}, "compressed": np.array([True])}
    (folder / "Rdata.rdx").write_bytes(gzip.compress(_rds_bytes(tmp_path, index, "index")))
    return folder, objects


def test_reads_every_chunk_encoding(lazydb):
    from dropinf.data.rlazy import LazyLoadDB

    folder, objects = lazydb
    db = LazyLoadDB(folder)
    assert db.names() == sorted(objects)
    for name, (obj, _) in objects.items():
        got = np.asarray(db[name])
        assert got.tolist() == obj.tolist(), name


def test_errors_are_clear(lazydb, tmp_path):
    from dropinf.data.rlazy import LazyLoadDB, decompress_chunk

    folder, _ = lazydb
    with pytest.raises(DropinfError, match="no object 'nope'"):
        LazyLoadDB(folder)["nope"]
    with pytest.raises(DropinfError, match="missing"):
        LazyLoadDB(tmp_path)
    bad = struct.pack(">I", 99) + b"0" + b"short"
    with pytest.raises(DropinfError, match="header says 99"):
        decompress_chunk(bad)
