"""A processor for the fetch workers test, importable by name in forkserver workers: bodies that say
`crash`, `hang` or `raise` do that; anything else is processed as usual."""

import os
import time

from ovis_data.fetch.images import ImageParams, Processed, process_image


def process(data: bytes, params: ImageParams, sha256: str | None) -> Processed:
    if data == b"crash":
        os._exit(3)
    if data == b"hang":
        time.sleep(60)
    if data == b"raise":
        raise ValueError("boom")
    return process_image(data, params, sha256)
