"""Work functions for the fetch pool test: importable by name in forkserver workers."""

import os
import time


def work(x: object) -> object:
    if x == "crash":
        os._exit(3)
    if x == "hang":
        time.sleep(60)
    if x == "raise":
        raise ValueError("boom")
    return x * 2
