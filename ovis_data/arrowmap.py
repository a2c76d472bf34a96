"""Arrow IPC files read through a memory map whose resident pages can be let go.

Pack's workers read samples of the tokenized units and rows of a shards store's index at random, through
memory maps (no copy, pages shared with the kernel's cache). Each touch maps not one page but the cached
pages around it (the kernel's fault-around, 64 KiB), so over one shard of random reads a worker's RSS
grew by the size of every file it read (10M captions: ~1.3 GB per worker). `trim()` drops this process's
mappings of those pages (madvise MADV_DONTNEED): the data stays valid and in the page cache, the next
read maps its page again for a minor fault, and the RSS goes back to what the process itself allocated.
"""

from __future__ import annotations

import mmap
import os

import pyarrow as pa


class MappedArrow:
    """The table of an Arrow IPC file, its buffers pointing into a read-only memory map of the file."""

    def __init__(self, path: str | os.PathLike):
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.table: pa.Table = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self._map))).read_all()

    def trim(self) -> None:
        """Let go of the pages this process has mapped (they stay cached; reading maps them again). A
        no-op where the platform has no madvise (the pages then stay mapped until the map is dropped)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)
