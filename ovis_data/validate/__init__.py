"""`ovis-data validate`: check meta files against image stores, write catalogs of good samples and a report.

`dataset` runs one dataset's checks (and `ensure_catalog`, which pack calls where a catalog is missing);
`metafile` reads meta files; `samplecheck` holds the per-sample rules; `imagecheck` checks images in
worker processes; `catalog` names and reads the catalogs; `bad_samples_report` writes the report. Import
from those modules: this file imports nothing, so that reading a catalog does not pull in DuckDB.
"""
