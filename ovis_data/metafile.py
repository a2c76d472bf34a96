"""Read any meta-file form (JSON list, JSON lines, parquet) into a normalized DuckDB table, streaming.

Parsing happens in DuckDB's native reader: a multi-GB meta file never becomes Python dicts. Every
column is read as JSON so that one sample with a wrong type is a per-sample schema error, not a
failure of the whole file. The table `meta` gets: row, id, images, roles, texts, caption, reason, detail.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

from .errors import OvisDataError
from .registry import DatasetSpec

CONVERSATION_COLUMNS = ("id", "image", "conversations")
CAPTION_COLUMNS = ("id", "image_path", "caption")
ROLES = ("system", "human", "gpt")


def _source_sql(path: Path, columns: tuple[str, ...], con: duckdb.DuckDBPyConnection) -> str:
    """A SELECT yielding `row` plus each column as JSON (NULL when the key or column is absent)."""
    p = str(path).replace("'", "''")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        present = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{p}')").fetchall()}
        cols = ", ".join(
            f'to_json("{c}") AS "{c}"' if c in present else f'NULL::JSON AS "{c}"' for c in columns
        )
        return f"SELECT row_number() OVER () - 1 AS row, {cols} FROM read_parquet('{p}')"
    if suffix in (".json", ".jsonl", ".ndjson"):
        spec = "{" + ", ".join(f"'{c}': 'JSON'" for c in columns) + "}"
        return (
            f"SELECT row_number() OVER () - 1 AS row, * FROM read_json('{p}', format='auto', "
            f"columns={spec}, maximum_object_size=268435456)"
        )
    raise OvisDataError(f"{path}: unsupported meta file type {suffix!r} (use .json, .jsonl or .parquet)")


def _json_position(path: Path, duck_error: str) -> str:
    """Line and column of a JSON syntax error (Python's parser, only on this error path)."""
    if path.stat().st_size <= 1 << 30:
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
                json.loads(text)
            else:
                for lineno, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        try:
                            json.loads(line)
                        except json.JSONDecodeError as e:
                            return f"malformed JSON at line {lineno} column {e.colno}: {e.msg}"
        except json.JSONDecodeError as e:
            return f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
    return f"malformed JSON: {duck_error.splitlines()[0]}"


# Three materialized steps: each JSON value is parsed once (CASE branches would re-evaluate it).
_CONVERSATION_SQL = (
    """
CREATE OR REPLACE TEMP TABLE meta_raw AS
SELECT row, id AS id_json, json_type(image) AS image_type, image AS image_json,
  json_type(conversations) AS conv_type,
  json_extract_string(conversations, '$[*].from') AS roles,
  json_extract(conversations, '$[*].value') AS vals,
  CASE WHEN json_type(conversations) = 'ARRAY' THEN json_array_length(conversations) END AS n_turns
FROM ({source})
""",
    """
CREATE OR REPLACE TEMP TABLE meta_norm AS
SELECT row,
  CASE WHEN id_json IS NULL OR json_type(id_json) = 'NULL' THEN $dataset || '-' || row::VARCHAR
       WHEN json_type(id_json) = 'VARCHAR' THEN id_json->>'$' ELSE id_json::VARCHAR END AS id,
  CASE image_type WHEN 'VARCHAR' THEN [image_json->>'$']
       WHEN 'ARRAY' THEN json_extract_string(image_json, '$[*]') ELSE []::VARCHAR[] END AS images,
  image_type,
  CASE WHEN image_type = 'ARRAY' THEN list_bool_or([json_type(x) <> 'VARCHAR'
       for x in json_extract(image_json, '$[*]')]) END AS bad_image_items,
  conv_type, n_turns, roles,
  [v->>'$' for v in vals] AS texts,
  list_bool_or([json_type(v) <> 'VARCHAR' for v in vals]) AS bad_values,
  [r for r in roles if r NOT IN ('system', 'human', 'gpt')] AS unknown_roles
FROM meta_raw
""",
    """
CREATE OR REPLACE TEMP TABLE meta AS
WITH m AS (
  SELECT *, list_sum([(length(t) - length(replace(t, '<image>', ''))) // 7 for t in texts]) AS markers,
    CASE
      WHEN conv_type IS NULL OR conv_type = 'NULL' THEN 'missing_field'
      WHEN conv_type <> 'ARRAY' THEN 'bad_type'
      WHEN n_turns = 0 THEN 'empty_conversation'
      WHEN image_type NOT IN ('VARCHAR', 'ARRAY', 'NULL') OR bad_image_items THEN 'bad_type'
      WHEN len(roles) <> n_turns OR len(texts) <> n_turns THEN 'missing_field'
      WHEN bad_values THEN 'bad_type'
      WHEN len(unknown_roles) > 0 THEN 'unknown_role'
      WHEN NOT $has_images AND len(images) > 0 THEN 'unexpected_image'
    END AS early
  FROM meta_norm
)
SELECT row, id, images, roles, texts, NULL::VARCHAR AS caption,
  coalesce(early, CASE WHEN coalesce(markers, 0) <> len(images) THEN 'image_marker_mismatch' END) AS reason,
  CASE
    WHEN early IS NULL AND coalesce(markers, 0) <> len(images)
      THEN coalesce(markers, 0)::VARCHAR || ' <image> marker(s) for ' || len(images)::VARCHAR || ' image(s)'
    WHEN early IS NULL THEN NULL
    WHEN conv_type IS NULL OR conv_type = 'NULL' THEN 'no "conversations"'
    WHEN conv_type <> 'ARRAY' THEN '"conversations" is ' || conv_type || ', not a list'
    WHEN n_turns = 0 THEN '"conversations" is empty'
    WHEN image_type NOT IN ('VARCHAR', 'ARRAY', 'NULL')
      THEN '"image" is ' || image_type || ', not a string or a list of strings'
    WHEN bad_image_items THEN '"image" list holds a non-string'
    WHEN len(roles) <> n_turns OR len(texts) <> n_turns THEN 'a turn lacks "from" or "value"'
    WHEN bad_values THEN 'a turn''s "value" is not a string'
    WHEN len(unknown_roles) > 0 THEN 'role ' || to_json(unknown_roles[1])::VARCHAR
      || ' is not one of system, human, gpt'
    ELSE 'text-only dataset (no image_dir) but the sample names images'
  END AS detail
FROM m ORDER BY row
""",
    "DROP TABLE meta_raw",
    "DROP TABLE meta_norm",
)

_CAPTION_SQL = (
    """
CREATE OR REPLACE TEMP TABLE meta AS
WITH src AS ({source})
SELECT row,
  CASE WHEN id IS NULL OR json_type(id) = 'NULL' THEN $dataset || '-' || row::VARCHAR
       WHEN json_type(id) = 'VARCHAR' THEN json_extract_string(id, '$') ELSE id::VARCHAR END AS id,
  CASE WHEN json_type(image_path) = 'VARCHAR' THEN [json_extract_string(image_path, '$')]
       ELSE []::VARCHAR[] END AS images,
  NULL::VARCHAR[] AS roles, NULL::VARCHAR[] AS texts,
  CASE WHEN json_type(caption) = 'VARCHAR' THEN json_extract_string(caption, '$') END AS caption,
  CASE
    WHEN image_path IS NULL OR json_type(image_path) = 'NULL' THEN 'missing_field'
    WHEN json_type(image_path) <> 'VARCHAR' THEN 'bad_type'
    WHEN caption IS NULL OR json_type(caption) = 'NULL' THEN 'missing_field'
    WHEN json_type(caption) <> 'VARCHAR' THEN 'bad_type'
    WHEN trim(json_extract_string(caption, '$')) = '' THEN 'empty_caption'
  END AS reason,
  CASE
    WHEN image_path IS NULL OR json_type(image_path) = 'NULL' THEN 'no "image_path"'
    WHEN json_type(image_path) <> 'VARCHAR'
      THEN '"image_path" is ' || json_type(image_path) || ', not a string'
    WHEN caption IS NULL OR json_type(caption) = 'NULL' THEN 'no "caption"'
    WHEN json_type(caption) <> 'VARCHAR' THEN '"caption" is ' || json_type(caption) || ', not a string'
    WHEN trim(json_extract_string(caption, '$')) = '' THEN 'caption is empty'
  END AS detail
FROM src
""",
)


def load_meta(con: duckdb.DuckDBPyConnection, spec: DatasetSpec, path: Path) -> int:
    """Create the temp table `meta` for one dataset's meta file; returns its number of rows."""
    columns = CAPTION_COLUMNS if spec.data_format == "caption" else CONVERSATION_COLUMNS
    template = _CAPTION_SQL if spec.data_format == "caption" else _CONVERSATION_SQL
    params: dict[str, object] = {"dataset": spec.name, "has_images": spec.image_dir is not None}
    try:
        source = _source_sql(path, columns, con)
        for statement in template:
            sql = statement.format(source=source)
            con.execute(sql, {k: v for k, v in params.items() if f"${k}" in sql})
    except duckdb.InvalidInputException as e:
        if "Malformed JSON" in str(e) or "JSON" in str(e):
            raise OvisDataError(f"{path}: {_json_position(path, str(e))}") from e
        raise OvisDataError(f"{path}: unreadable meta file: {str(e).splitlines()[0]}") from e
    except duckdb.IOException as e:
        raise OvisDataError(f"{path}: unreadable meta file: {str(e).splitlines()[0]}") from e
    if spec.data_format == "caption" and path.suffix.lower() == ".parquet":
        present = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()}
        missing = [c for c in ("caption", "image_path") if c not in present]
        if missing:
            raise OvisDataError(f"{path}: caption meta file lacks column(s) {missing}")
    # './a.jpg' names the same file as 'a.jpg': normalize once so joins and the catalog agree.
    con.execute(
        r"""UPDATE meta SET images = [regexp_replace(x, '^(\./)+', '') for x in images]
            WHERE list_bool_or([starts_with(x, './') for x in images])"""
    )
    return con.execute("SELECT count(*) FROM meta").fetchall()[0][0]
