"""The fetch workers under failure: a crash or a hang while decoding costs only its own image, never
the run, and the downloads the dead worker had in flight are finished by the others."""

from __future__ import annotations

import time
from pathlib import Path

from test_fetch_faults import statuses
from test_fetch_resume import IMAGES
from test_fetch_support import FAST_NET, FaultServer, write_url_list

from ovis_data.fetch import FetchOptions, fetch_url_list, open_url_list, serve_app


def test_crash_hang_and_exception_fail_only_their_own_row(tmp_path: Path) -> None:
    bodies = {**IMAGES, "crash.jpg": b"crash", "hang.jpg": b"hang", "raise.jpg": b"raise"}
    names = sorted(IMAGES)[:24]
    order = names[:6] + ["crash.jpg"] + names[6:12] + ["hang.jpg"] + names[12:18] + ["raise.jpg"] + names[18:]
    server = FaultServer(bodies, delay_s=0.05)  # downloads overlap: a dying worker has some in flight
    with serve_app(server.app()) as base:
        url_list = write_url_list(tmp_path / "u.parquet", [f"{base}/img/{n}" for n in order], order)
        opts = FetchOptions(
            net=FAST_NET, processes=2, process_deadline_s=1.5, processor="crashy_processor:process"
        )
        started = time.perf_counter()
        report = fetch_url_list(open_url_list(url_list, "url", "image_path"), tmp_path / "d", opts)
    assert time.perf_counter() - started < 30, "a hung worker must be replaced, not waited for"
    assert report.failed == {"worker_crash": 2, "watchdog": 1} and report.success == len(names)
    got = statuses(tmp_path / "d", "files")
    assert (got["crash.jpg"], got["hang.jpg"], got["raise.jpg"]) == (
        "worker_crash",
        "watchdog",
        "worker_crash",
    )
    for n in names:
        assert (tmp_path / "d" / n).exists() and server.hits[f"/img/{n}"] <= 2
