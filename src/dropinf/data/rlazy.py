"""Read R lazy-load databases (`data/Rdata.rdx` + `data/Rdata.rdb`) without R.

R packages store their data sets as a lazy-load database: `Rdata.rdx` is a (gzip-compressed)
RDS of a list whose `variables` entry maps each object name to an (offset, length) pair in
`Rdata.rdb`. Each chunk there is a 4-byte big-endian uncompressed length followed by either a
type byte and a payload (`Z`: raw LZMA2 stream, `2`: bzip2, `1`: zlib, `0`: stored) or, with no
type byte (R's default), a zlib stream directly. The decompressed bytes are a serialized R object
(RDS without the outer compression), which the `rdata` package turns into pandas/numpy objects.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import warnings
import zlib
from pathlib import Path

from ..errors import DropinfError


def _rdata():
    try:
        import rdata  # noqa: F401
        import rdata.conversion
        import rdata.parser
    except ImportError:
        raise DropinfError("reading R data sets needs the `rdata` package: `pip install rdata` "
                           "(or `pip install dropinf[data]`)") from None
    return rdata


def _parse_rds(raw: bytes):
    rdata = _rdata()
    with warnings.catch_warnings():
        # tibbles have no dedicated constructor in rdata; the data.frame fallback is what we want
        warnings.filterwarnings("ignore", message="Missing constructor for R class")
        parsed = rdata.parser.parse_data(raw, extension=".rds")
        return rdata.conversion.convert(parsed)


def decompress_chunk(blob: bytes) -> bytes:
    """Decode one lazy-load chunk (length header + optional type byte + payload)."""
    if len(blob) < 5:
        raise DropinfError(f"R lazy-load chunk too short ({len(blob)} bytes)")
    n = struct.unpack(">I", blob[:4])[0]
    kind, body = blob[4:5], blob[5:]
    if kind == b"Z":
        out = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    elif kind == b"2":
        out = bz2.decompress(body)
    elif kind == b"1":
        out = zlib.decompress(body)
    elif kind == b"0":
        out = body
    else:  # no type byte: the zlib stream starts right after the length
        out = zlib.decompress(blob[4:])
    if len(out) != n:
        raise DropinfError(f"R lazy-load chunk: header says {n} bytes, decompressed {len(out)}")
    return out


class LazyLoadDB:
    """One lazy-load database, e.g. `LazyLoadDB("/usr/lib/R/site-library/modeldata/data")`.

    `names()` lists the objects; `db["training_data"]` parses one (a pandas DataFrame for a
    data.frame/tibble, a numpy array for a vector).
    """

    def __init__(self, folder: str | Path, stem: str = "Rdata"):
        folder = Path(folder)
        self.rdx, self.rdb = folder / f"{stem}.rdx", folder / f"{stem}.rdb"
        for f in (self.rdx, self.rdb):
            if not f.exists():
                raise DropinfError(f"R lazy-load database incomplete: {f} is missing")
        raw = self.rdx.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        index = _parse_rds(raw)
        try:
            variables = index["variables"]
        except (KeyError, TypeError):
            raise DropinfError(f"{self.rdx} is not a lazy-load index (no 'variables' entry)") from None
        self._where = {str(k): (int(v[0]), int(v[1])) for k, v in variables.items()}

    def names(self) -> list[str]:
        return sorted(self._where)

    def raw(self, name: str) -> bytes:
        """The decompressed serialized bytes of one object."""
        try:
            off, length = self._where[name]
        except KeyError:
            raise DropinfError(f"{self.rdb.parent}: no object {name!r}; has {self.names()}") from None
        with open(self.rdb, "rb") as f:
            f.seek(off)
            blob = f.read(length)
        if len(blob) != length:
            raise DropinfError(f"{self.rdb} is truncated (object {name!r})")
        return decompress_chunk(blob)

    def __getitem__(self, name: str):
        return _parse_rds(self.raw(name))
