"""A spanned zip (`zip -s`: parts .z01, .z02, ... then .zip) read as one stream of local headers.

Such an archive's central directory counts offsets per part ("disk"), which Python's zipfile refuses; its
local file headers, though, follow each other through the concatenated parts. This reads them in order:
each member's data is inflated (deflate: the stream's own end marks the member's end, so a data
descriptor's missing sizes do not matter) or copied (stored, with its size in the header), and its CRC-32
checked. Links and file modes live only in the central directory: every member is written as a file.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from .download import SourceFailed

SPLIT_MARKS = (b"PK\x07\x08", b"PK00")  # first bytes of a spanned (or split) archive
LOCAL, DESCRIPTOR = b"PK\x03\x04", b"PK\x07\x08"
ENDS = (b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07")  # central directory, end records
CHUNK = 1 << 20


def is_spanned(stream: BinaryIO) -> bool:
    head = stream.read(4)
    stream.seek(0)
    return head in SPLIT_MARKS


class _Bytes:
    """The stream with a push-back buffer."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.buf = stream, bytearray()

    def chunk(self) -> bytes:
        if self.buf:
            out = bytes(self.buf)
            self.buf.clear()
            return out
        return self.stream.read(CHUNK)

    def exactly(self, n: int, label: str) -> bytes:
        while len(self.buf) < n:
            more = self.stream.read(max(CHUNK, n - len(self.buf)))
            if not more:
                raise SourceFailed(f"{label}: the spanned zip ends inside a member (a part missing?)")
            self.buf += more
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def unread(self, data: bytes) -> None:
        self.buf[:0] = data


class _Member:
    """One member's bytes, read from the shared stream; must be read to its end before the next."""

    def __init__(self, src: _Bytes, method: int, size: int | None, label: str, name: str):
        self.src, self.method, self.left, self.label, self.name = src, method, size, label, name
        self.crc, self.done = 0, False
        self.inflate = zlib.decompressobj(-15) if method == 8 else None

    def read(self, n: int = -1) -> bytes:
        while not self.done:
            if self.inflate is not None:
                data = self.src.chunk()
                if not data:
                    raise SourceFailed(f"{self.label}: {self.name!r} is cut short")
                try:
                    out = self.inflate.decompress(data)
                except zlib.error as e:
                    raise SourceFailed(f"{self.label}: {self.name!r} is damaged ({e})") from e
                if self.inflate.eof:
                    self.src.unread(self.inflate.unused_data)
                    self.done = True
            else:
                assert self.left is not None
                out = self.src.exactly(min(self.left, CHUNK), self.label) if self.left else b""
                self.left -= len(out)
                self.done = self.left == 0
            self.crc = zlib.crc32(out, self.crc)
            if out:
                return out
        return b""

    def drain(self) -> None:
        while self.read():
            pass


def spanned_members(stream: BinaryIO, label: str) -> Iterator[tuple[str, bool, _Member | None]]:
    """(name, is_dir, reader) per member, in archive order; a reader left unread is skipped over."""
    src = _Bytes(stream)
    first = src.exactly(4, label)
    if first not in SPLIT_MARKS:
        src.unread(first)
    while True:
        sig = src.exactly(4, label)
        if sig in ENDS:
            return
        if sig != LOCAL:
            raise SourceFailed(f"{label}: not a zip member header where one should be (parts out of order?)")
        _, flags, method, _, _, crc, csize, usize, nlen, xlen = struct.unpack(
            "<HHHHHIIIHH", src.exactly(26, label)
        )
        name = src.exactly(nlen, label).decode("utf-8" if flags & 0x800 else "cp437")
        extra = src.exactly(xlen, label)
        zip64 = False
        if 0xFFFFFFFF in (csize, usize):  # the real sizes are in the zip64 extra field
            i = 0
            while i + 4 <= len(extra):
                tag, length = struct.unpack("<HH", extra[i : i + 4])
                if tag == 1:
                    usize, csize = struct.unpack("<QQ", extra[i + 4 : i + 20])
                    zip64 = True
                i += 4 + length
        if flags & 1:
            raise SourceFailed(f"{label}: {name!r} is encrypted")
        if method not in (0, 8):
            raise SourceFailed(
                f"{label}: {name!r} uses compression method {method} (only stored and deflate)"
            )
        known = not flags & 8
        if method == 0 and not known:
            raise SourceFailed(f"{label}: {name!r} is stored without its size: run `zip -s 0` on it by hand")
        member = _Member(src, method, csize if method == 0 else None, label, name)
        is_dir = name.endswith("/")
        yield name, is_dir, None if is_dir else member
        member.drain()
        if not known:  # a data descriptor: [signature] crc, then 4- or 8-byte sizes
            head = src.exactly(4, label)
            crc = struct.unpack("<I", src.exactly(4, label) if head == DESCRIPTOR else head)[0]
            src.exactly(8, label)
            if zip64:
                src.exactly(8, label)
            else:
                following = src.exactly(4, label)
                src.unread(following)
                if following != LOCAL and following not in ENDS:
                    src.exactly(8, label)  # 8-byte sizes after all
        if member.crc != crc:
            raise SourceFailed(f"{label}: {name!r} fails its CRC-32 check (damaged)")
