"""`ovis-data report`: one self-contained HTML page about a stage's data (docs/report.md).

stats (counts and histograms, by DuckDB over the catalogs), tokens (exact token counts with a tokenizer),
gallery (seeded samples, thumbnails, conversations marked as `inspect` marks them), packed (a pack
manifest's shards, fill and drops), svg and page (drawing), build (the whole report). Import from those
modules: this file imports nothing.
"""
