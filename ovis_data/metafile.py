"""Read any meta-file form (JSON list, JSON lines, parquet) into a normalized DuckDB table, streaming.

Parsing happens in DuckDB's native reader: a multi-GB meta file never becomes Python dicts. A typed
read of the conversations is tried first (fast); when some sample does not fit that shape (say,
"conversations" is a string), the file is read again with every column as JSON so that the bad sample
becomes a per-sample schema error, not a failure of the whole file. Turn values that are numbers are
read as their text. The table `meta` gets: row, id, images, roles, texts, caption, reason, detail.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

from .errors import OvisDataError
from .registry import DatasetSpec

CONVERSATION_COLUMNS = ("id", "image", "conversations")
CAPTION_COLUMNS = ("id", "image_path", "caption")
TYPED_CONVERSATIONS = {"conversations": 'STRUCT("from" VARCHAR, "value" VARCHAR)[]'}


def _source_sql(
    path: Path, columns: tuple[str, ...], con: duckdb.DuckDBPyConnection, typed: dict | None = None
) -> str:
    """A SELECT yielding `row` plus each column as JSON (or the given type); NULL when absent."""
    p = str(path).replace("'", "''")
    suffix = path.suffix.lower()
    typed = typed or {}
    if suffix == ".parquet":
        present = _parquet_columns(con, path)
        cols = ", ".join(
            f'to_json("{c}") AS "{c}"' if c in present else f'NULL::JSON AS "{c}"' for c in columns
        )
        return f"SELECT row_number() OVER () - 1 AS row, {cols} FROM read_parquet('{p}')"
    if suffix in (".json", ".jsonl", ".ndjson"):
        spec = "{" + ", ".join(f"'{c}': '{typed.get(c, 'JSON')}'" for c in columns) + "}"
        # Naming the form reads twice as fast as DuckDB's format='auto', which parses to detect it.
        form = "array" if _first_char(path) == "[" else "newline_delimited"
        return (
            f"SELECT row_number() OVER () - 1 AS row, * FROM read_json('{p}', format='{form}', "
            f"columns={spec}, maximum_object_size=268435456)"
        )
    raise OvisDataError(f"{path}: unsupported meta file type {suffix!r} (use .json, .jsonl or .parquet)")


def _parquet_columns(con: duckdb.DuckDBPyConnection, path: Path) -> set[str]:
    p = str(path).replace("'", "''")
    return {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{p}')").fetchall()}


def _first_char(path: Path) -> str:
    """The first non-blank character of a file (a JSON list starts with '[')."""
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return chr(stripped[0])
    return ""


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


# The scan is materialized on its own: numbering rows needs the whole input, and extracting in the
# same statement ran single-threaded and 3x slower. Each JSON value is then parsed once.
_TURNS_TYPED = """
SELECT row, id AS id_json, image AS image_json, json_type(image) AS image_type,
  CASE WHEN conversations IS NULL THEN 'NULL' ELSE 'ARRAY' END AS conv_type,
  len(conversations) AS n_turns,
  [t."from" for t in conversations] AS roles,
  [t."value" for t in conversations] AS texts,
  list_bool_or([t."from" IS NULL OR t."value" IS NULL for t in conversations]) AS missing_parts
FROM meta_src
"""

_TURNS_JSON = """
SELECT row, id AS id_json, image AS image_json, json_type(image) AS image_type,
  coalesce(json_type(conversations), 'NULL') AS conv_type,
  CASE WHEN json_type(conversations) = 'ARRAY' THEN json_array_length(conversations) END AS n_turns,
  json_extract_string(conversations, '$[*].from') AS roles,
  json_extract_string(conversations, '$[*].value') AS texts,
  len(json_extract_string(conversations, '$[*].from')) <> json_array_length(conversations)
    OR len(json_extract_string(conversations, '$[*].value')) <> json_array_length(conversations)
    AS missing_parts
FROM meta_src
"""

_CONVERSATION_FINAL = """
CREATE OR REPLACE TEMP TABLE meta AS
WITH t AS ({turns}),
n AS (
  SELECT row, conv_type, n_turns, roles, texts, missing_parts, image_type,
    CASE WHEN id_json IS NULL OR json_type(id_json) = 'NULL' THEN $dataset || '-' || row::VARCHAR
         WHEN json_type(id_json) = 'VARCHAR' THEN id_json->>'$' ELSE id_json::VARCHAR END AS id,
    CASE image_type WHEN 'VARCHAR' THEN [image_json->>'$']
         WHEN 'ARRAY' THEN json_extract_string(image_json, '$[*]') ELSE []::VARCHAR[] END AS images,
    CASE WHEN image_type = 'ARRAY' THEN list_bool_or([json_type(x) <> 'VARCHAR'
         for x in json_extract(image_json, '$[*]')]) END AS bad_image_items,
    [r for r in roles if r NOT IN ('system', 'human', 'gpt')] AS unknown_roles,
    list_sum([len(string_split(t, '<image>')) - 1 for t in texts]) AS markers
  FROM t
),
m AS (
  SELECT *,
    CASE
      WHEN conv_type = 'NULL' THEN 'missing_field'
      WHEN conv_type <> 'ARRAY' THEN 'bad_type'
      WHEN n_turns = 0 THEN 'empty_conversation'
      WHEN image_type NOT IN ('VARCHAR', 'ARRAY', 'NULL') OR bad_image_items THEN 'bad_type'
      WHEN missing_parts THEN 'missing_field'
      WHEN len(unknown_roles) > 0 THEN 'unknown_role'
      WHEN NOT $has_images AND len(images) > 0 THEN 'unexpected_image'
      WHEN coalesce(markers, 0) <> len(images) THEN 'image_marker_mismatch'
    END AS reason
  FROM n
)
SELECT row, id, images, roles, texts, NULL::VARCHAR AS caption, reason,
  CASE reason
    WHEN 'missing_field' THEN CASE WHEN conv_type = 'NULL' THEN 'no "conversations"'
                                   ELSE 'a turn lacks "from" or "value"' END
    WHEN 'bad_type' THEN CASE
      WHEN conv_type <> 'ARRAY' THEN '"conversations" is ' || conv_type || ', not a list'
      WHEN bad_image_items THEN '"image" list holds a non-string'
      ELSE '"image" is ' || image_type || ', not a string or a list of strings' END
    WHEN 'empty_conversation' THEN '"conversations" is empty'
    WHEN 'unknown_role'
      THEN 'role ' || to_json(unknown_roles[1])::VARCHAR || ' is not one of system, human, gpt'
    WHEN 'unexpected_image' THEN 'text-only dataset (no image_dir) but the sample names images'
    WHEN 'image_marker_mismatch'
      THEN coalesce(markers, 0)::VARCHAR || ' <image> marker(s) for ' || len(images)::VARCHAR || ' image(s)'
  END AS detail
FROM m
"""

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


def _run(con: duckdb.DuckDBPyConnection, statements: list[str], params: dict[str, object]) -> None:
    for sql in statements:
        con.execute(sql, {k: v for k, v in params.items() if f"${k}" in sql})


def load_meta(con: duckdb.DuckDBPyConnection, spec: DatasetSpec, path: Path) -> int:
    """Create the temp table `meta` for one dataset's meta file; returns its number of rows."""
    params: dict[str, object] = {"dataset": spec.name, "has_images": spec.image_dir is not None}
    try:
        if spec.data_format == "caption":
            if path.suffix.lower() == ".parquet":
                missing = [c for c in ("caption", "image_path") if c not in _parquet_columns(con, path)]
                if missing:
                    raise OvisDataError(f"{path}: caption meta file lacks column(s) {missing}")
            source = _source_sql(path, CAPTION_COLUMNS, con)
            _run(con, [s.format(source=source) for s in _CAPTION_SQL], params)
        else:
            try:
                source = _source_sql(path, CONVERSATION_COLUMNS, con, TYPED_CONVERSATIONS)
                _run(con, [f"CREATE OR REPLACE TEMP TABLE meta_src AS {source}"], params)
                turns = _TURNS_TYPED
            except duckdb.InvalidInputException as e:
                if "transform error" not in str(e).lower() and "conversion" not in str(e).lower():
                    raise
                # Some sample does not fit the typed shape: read everything as JSON to name it.
                source = _source_sql(path, CONVERSATION_COLUMNS, con)
                _run(con, [f"CREATE OR REPLACE TEMP TABLE meta_src AS {source}"], params)
                turns = _TURNS_JSON
            _run(con, [_CONVERSATION_FINAL.format(turns=turns), "DROP TABLE meta_src"], params)
    except duckdb.InvalidInputException as e:
        if "JSON" in str(e):
            raise OvisDataError(f"{path}: {_json_position(path, str(e))}") from e
        raise OvisDataError(f"{path}: unreadable meta file: {str(e).splitlines()[0]}") from e
    except duckdb.IOException as e:
        raise OvisDataError(f"{path}: unreadable meta file: {str(e).splitlines()[0]}") from e
    # './a.jpg' names the same file as 'a.jpg': normalize once so joins and the catalog agree.
    con.execute(
        r"""UPDATE meta SET images = [regexp_replace(x, '^(\./)+', '') for x in images]
            WHERE list_bool_or([starts_with(x, './') for x in images])"""
    )
    return con.execute("SELECT count(*) FROM meta").fetchall()[0][0]
