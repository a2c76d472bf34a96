"""Read any meta-file form (JSON list, JSON lines, parquet) into a normalized DuckDB table, streaming.

Parsing happens in DuckDB's native reader: a multi-GB meta file never becomes Python dicts. A typed
read of the samples is tried first (fast); when some sample does not fit that shape (a sample that is
not an object, "conversations" that is a string, a turn that is not an object, a turn without "from" or
"value"), the file is read again with each sample as one JSON value, so that the bad sample becomes a
per-sample reason, not a failure of the whole file. Turn values that are numbers are read as their
text; any other non-text value is `bad_type`. The table `meta` gets: row, id, images, roles, texts,
caption, reason, detail.

A file that cannot be read as a whole (malformed JSON, no samples, valid JSON of another shape, a
parquet without the needed columns) raises MetaFileError with a plain reason and detail.
"""

from __future__ import annotations

import codecs
import contextlib
import json
from pathlib import Path

import duckdb
import pyarrow as pa

from .errors import OvisDataError
from .pack.templates import clean_caption
from .registry import DatasetSpec

CONVERSATION_COLUMNS = ("id", "image", "conversations")
CAPTION_COLUMNS = ("id", "image_path", "caption")
TYPED_CONVERSATIONS = {"conversations": 'STRUCT("from" VARCHAR, "value" JSON)[]'}
MAX_OBJECT_BYTES = 268435456
# JSON types a turn value may have: text, or a number (read as its text).
TEXT_TYPES = "('VARCHAR', 'BIGINT', 'UBIGINT', 'DOUBLE')"


class MetaFileError(OvisDataError):
    """The meta file as a whole is unusable; `reason` is meta_file_malformed or meta_file_empty."""

    def __init__(self, reason: str, path: Path, detail: str):
        super().__init__(f"{path}: {detail}")
        self.reason, self.path, self.detail = reason, path, detail


def _json_form(path: Path) -> str:
    # Naming the form reads twice as fast as DuckDB's format='auto', which parses to detect it. A .jsonl
    # file is JSON lines even when its first sample is a list (one bad sample, not a JSON list).
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "newline_delimited"
    return "array" if _first_char(path) == "[" else "newline_delimited"


def _source_sql(
    path: Path, columns: tuple[str, ...], con: duckdb.DuckDBPyConnection, typed: dict | None = None
) -> str:
    """A SELECT yielding `row`, `sample_type` ('OBJECT' here) plus each column as JSON (or the given
    type); NULL when absent. Fails on a sample that does not fit (see _generic_source_sql)."""
    p = _quote(path)
    typed = typed or {}
    if _is_parquet(path):
        present = _parquet_columns(con, path)
        cols = ", ".join(
            f'to_json("{c}") AS "{c}"' if c in present else f'NULL::JSON AS "{c}"' for c in columns
        )
        return (
            f"SELECT row_number() OVER () - 1 AS row, 'OBJECT' AS sample_type, {cols} "
            f"FROM read_parquet('{p}')"
        )
    spec = "{" + ", ".join(f"'{c}': '{typed.get(c, 'JSON')}'" for c in columns) + "}"
    return (
        f"SELECT row_number() OVER () - 1 AS row, 'OBJECT' AS sample_type, * FROM read_json('{p}', "
        f"format='{_json_form(path)}', columns={spec}, maximum_object_size={MAX_OBJECT_BYTES})"
    )


def _generic_source_sql(path: Path, columns: tuple[str, ...]) -> str:
    """Each sample as one JSON value, whatever it is: its type, and each column extracted (NULL when the
    sample is not an object or lacks the key)."""
    cols = ", ".join(f'json_extract(j, \'$."{c}"\') AS "{c}"' for c in columns)
    return (
        "SELECT row_number() OVER () - 1 AS row, coalesce(json_type(j), 'NULL') AS sample_type, "
        f"{cols} FROM read_json('{_quote(path)}', format='{_json_form(path)}', records='false', "
        f"columns={{'j': 'JSON'}}, maximum_object_size={MAX_OBJECT_BYTES})"
    )


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def _parquet_columns(con: duckdb.DuckDBPyConnection, path: Path) -> set[str]:
    return {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{_quote(path)}')").fetchall()}


def _first_char(path: Path) -> str:
    """The first non-blank character of a file (a JSON list starts with '[')."""
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return chr(stripped[0])
    return ""


def _position(lines_before: int, text: str, pos: int, col_base: int) -> str:
    """1-based line and column of text[pos], text starting `col_base` characters into line
    lines_before + 1."""
    line = lines_before + text.count("\n", 0, pos) + 1
    nl = text.rfind("\n", 0, pos)
    column = pos - nl if nl >= 0 else col_base + pos + 1
    return f"line {line} column {column}"


def _json_msg(e: json.JSONDecodeError) -> str:
    """Python's reason without its dangling ' at' (the position is given before it)."""
    return e.msg[: -len(" at")] + " here" if e.msg.endswith(" at") else e.msg


def json_problem(path: Path, form: str) -> str | None:
    """Where and why a JSON list or JSON-lines file is not valid JSON, in plain words (streaming, so a
    file of any size; only run once DuckDB has refused the file). None when Python finds no fault."""
    if form == "newline_delimited":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"line {lineno} column {e.start + 1}: not UTF-8 text"
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"line {lineno} column {e.colno}: {_json_msg(e)}"
        return None
    return _array_problem(path)


def _array_problem(path: Path, chunk: int = 1 << 24) -> str | None:
    """A JSON list checked one element at a time; the buffer only ever holds the current element."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        buf, pos, lines_before, col_base, eof = "", 0, 0, 0, False

        def more() -> bool:
            nonlocal buf, pos, lines_before, col_base, eof
            if eof:
                return False
            data = f.read(chunk)
            eof = not data
            # Drop what is consumed, keeping positions: newlines counted, columns of the current line.
            done = buf[:pos]
            nl = done.rfind("\n")
            lines_before += done.count("\n")
            col_base = len(done) - nl - 1 if nl >= 0 else col_base + len(done)
            buf = buf[pos:] + utf8.decode(data, final=eof)
            pos = 0
            return True

        def skip_ws() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        def where() -> str:
            return _position(lines_before, buf, pos, col_base)

        try:
            if skip_ws() != "[":
                return f"{where()}: a JSON list must start with '['"
            pos += 1
            if skip_ws() == "]":
                pos += 1
            else:
                while True:
                    skip_ws()
                    while True:
                        try:
                            _, end = decoder.raw_decode(buf, pos)
                            break
                        except json.JSONDecodeError as e:
                            if not more():  # the whole rest of the file is there: a real fault
                                return f"{_position(lines_before, buf, e.pos, col_base)}: {_json_msg(e)}"
                    pos = end
                    c = skip_ws()
                    if c == "]":
                        pos += 1
                        break
                    if c != ",":
                        return f"{where()}: expecting ',' or ']' after a list element"
                    pos += 1
            if skip_ws():
                return f"{where()}: extra data after the list"
        except UnicodeDecodeError:
            return "not UTF-8 text"
    return None


def _malformed(path: Path, e: duckdb.Error | UnicodeDecodeError) -> MetaFileError:
    """A DuckDB refusal of the whole file, in plain words (never DuckDB's own)."""
    if _is_parquet(path):
        return MetaFileError("meta_file_malformed", path, "not a readable parquet file")
    form = _json_form(path)
    kind = "JSON list" if form == "array" else "JSON lines"
    problem = json_problem(path, form)
    if problem is None:
        text = str(e).lower()
        if "maximum_object_size" in text or "object size" in text:
            problem = f"a sample larger than {MAX_OBJECT_BYTES >> 20} MB"
        else:
            problem = "not valid JSON"
    return MetaFileError("meta_file_malformed", path, f"malformed {kind}: {problem}")


def _run(con: duckdb.DuckDBPyConnection, statements: list[str], params: dict[str, object]) -> None:
    for sql in statements:
        con.execute(sql, {k: v for k, v in params.items() if f"${k}" in sql})


# How a JSON type reads in a detail.
_WORDS = """
CREATE OR REPLACE TEMP MACRO json_word(t) AS CASE coalesce(t, 'NULL')
  WHEN 'VARCHAR' THEN 'a string' WHEN 'ARRAY' THEN 'a list' WHEN 'OBJECT' THEN 'an object'
  WHEN 'NULL' THEN 'null' WHEN 'BOOLEAN' THEN 'a boolean' ELSE 'a number' END
"""

# The scan is materialized on its own: numbering rows needs the whole input, and extracting in the
# same statement ran single-threaded and 3x slower. Each JSON value is then parsed once.
_TURNS_TYPED = """
SELECT row, sample_type, id AS id_json, image AS image_json, json_type(image) AS image_type,
  CASE WHEN conversations IS NULL THEN 'NULL' ELSE 'ARRAY' END AS conv_type,
  len(conversations) AS n_turns,
  NULL::INTEGER AS bad_turn, NULL::VARCHAR AS bad_turn_type, NULL::INTEGER AS missing_turn,
  NULL::VARCHAR AS missing_key,
  [t."from" for t in conversations] AS roles,
  [t."value" for t in conversations] AS values_json
FROM meta_src
"""

_TURNS_JSON = """
WITH s AS (
  SELECT row, sample_type, id AS id_json, image AS image_json, json_type(image) AS image_type,
    coalesce(json_type(conversations), 'NULL') AS conv_type,
    CASE WHEN json_type(conversations) = 'ARRAY' THEN json_extract(conversations, '$[*]') END AS turns
  FROM meta_src
), t AS (
  SELECT *, [coalesce(json_type(x), 'NULL') for x in turns] AS turn_types,
    list_position([(x->'from') IS NULL OR (x->'value') IS NULL for x in turns], true) AS missing_turn
  FROM s
)
SELECT row, sample_type, id_json, image_json, image_type, conv_type, len(turns) AS n_turns,
  list_position([y <> 'OBJECT' for y in turn_types], true) AS bad_turn,
  turn_types[list_position([y <> 'OBJECT' for y in turn_types], true)] AS bad_turn_type,
  missing_turn,
  CASE WHEN (turns[missing_turn]->'from') IS NULL THEN 'from' ELSE 'value' END AS missing_key,
  [x->>'from' for x in turns] AS roles,
  [x->'value' for x in turns] AS values_json
FROM t
"""

_CONVERSATION_FINAL = """
CREATE OR REPLACE TEMP TABLE meta AS
WITH t AS ({turns}),
v AS (
  SELECT *, [coalesce(json_type(x), 'NULL') for x in values_json] AS value_types FROM t
),
n AS (
  SELECT row, sample_type, conv_type, n_turns, roles, image_type, bad_turn, bad_turn_type, missing_turn,
    missing_key, value_types,
    list_position([y NOT IN {text_types} for y in value_types], true) AS bad_value,
    [CASE WHEN json_type(x) = 'VARCHAR' THEN x->>'$' ELSE x::VARCHAR END for x in values_json] AS texts,
    CASE WHEN id_json IS NULL OR json_type(id_json) = 'NULL' THEN $dataset || '-' || row::VARCHAR
         WHEN json_type(id_json) = 'VARCHAR' THEN id_json->>'$' ELSE id_json::VARCHAR END AS id,
    CASE image_type WHEN 'VARCHAR' THEN [image_json->>'$']
         WHEN 'ARRAY' THEN json_extract_string(image_json, '$[*]') ELSE []::VARCHAR[] END AS images,
    CASE WHEN image_type = 'ARRAY' THEN list_bool_or([json_type(x) <> 'VARCHAR'
         for x in json_extract(image_json, '$[*]')]) END AS bad_image_items
  FROM v
),
m AS (
  SELECT *,
    [r for r in roles if r NOT IN ('system', 'human', 'gpt')] AS unknown_roles,
    list_sum([len(string_split(t, '<image>')) - 1 for t in texts]) AS markers,
    CASE
      WHEN sample_type <> 'OBJECT' THEN 'bad_type'
      WHEN conv_type = 'NULL' THEN 'missing_field'
      WHEN conv_type <> 'ARRAY' THEN 'bad_type'
      WHEN n_turns = 0 THEN 'empty_conversation'
      WHEN image_type NOT IN ('VARCHAR', 'ARRAY', 'NULL') OR bad_image_items THEN 'bad_type'
      WHEN bad_turn IS NOT NULL THEN 'bad_type'
      WHEN missing_turn IS NOT NULL THEN 'missing_field'
      WHEN bad_value IS NOT NULL THEN 'bad_type'
    END AS shape_reason
  FROM n
),
r AS (
  SELECT *,
    coalesce(shape_reason, CASE
      WHEN len(unknown_roles) > 0 THEN 'unknown_role'
      WHEN NOT $has_images AND len(images) > 0 THEN 'unexpected_image'
      WHEN coalesce(markers, 0) <> len(images) THEN 'image_marker_mismatch'
    END) AS reason
  FROM m
)
SELECT row, id, images, roles, texts, NULL::VARCHAR AS caption, reason,
  CASE reason
    WHEN 'missing_field' THEN CASE WHEN conv_type = 'NULL' THEN 'no "conversations"'
      ELSE 'conversations[' || (missing_turn - 1)::VARCHAR || '] has no "' || missing_key || '"' END
    WHEN 'bad_type' THEN CASE
      WHEN sample_type <> 'OBJECT' THEN 'the sample is ' || json_word(sample_type) || ', not an object'
      WHEN conv_type <> 'ARRAY' THEN '"conversations" is ' || json_word(conv_type) || ', not a list'
      WHEN bad_image_items THEN '"image" list holds a non-string'
      WHEN image_type NOT IN ('VARCHAR', 'ARRAY', 'NULL')
        THEN '"image" is ' || json_word(image_type) || ', not a string or a list of strings'
      WHEN bad_turn IS NOT NULL
        THEN 'conversations[' || (bad_turn - 1)::VARCHAR || '] is ' || json_word(bad_turn_type)
             || ', not an object'
      ELSE 'conversations[' || (bad_value - 1)::VARCHAR || '] "value" is '
           || json_word(value_types[bad_value]) || ', not text' END
    WHEN 'empty_conversation' THEN '"conversations" is empty'
    WHEN 'unknown_role'
      THEN 'role ' || to_json(unknown_roles[1])::VARCHAR || ' is not one of system, human, gpt'
    WHEN 'unexpected_image' THEN 'text-only dataset (no image_dir) but the sample names images'
    WHEN 'image_marker_mismatch'
      THEN coalesce(markers, 0)::VARCHAR || ' <image> marker(s) for ' || len(images)::VARCHAR || ' image(s)'
  END AS detail
FROM r
"""

_CAPTION_SQL = """
CREATE OR REPLACE TEMP TABLE meta AS
WITH src AS (SELECT * FROM meta_src),
c AS (
  SELECT *, coalesce(json_type(image_path), 'NULL') AS path_type,
    coalesce(json_type(caption), 'NULL') AS cap_type
  FROM src
),
d AS (
  SELECT *, CASE WHEN cap_type = 'VARCHAR' THEN caption->>'$' END AS caption_text FROM c
)
SELECT row,
  CASE WHEN id IS NULL OR json_type(id) = 'NULL' THEN $dataset || '-' || row::VARCHAR
       WHEN json_type(id) = 'VARCHAR' THEN id->>'$' ELSE id::VARCHAR END AS id,
  CASE WHEN path_type = 'VARCHAR' THEN [image_path->>'$'] ELSE []::VARCHAR[] END AS images,
  NULL::VARCHAR[] AS roles, NULL::VARCHAR[] AS texts,
  caption_text AS caption,
  CASE
    WHEN sample_type <> 'OBJECT' THEN 'bad_type'
    WHEN path_type = 'NULL' THEN 'missing_field'
    WHEN path_type <> 'VARCHAR' THEN 'bad_type'
    WHEN cap_type = 'NULL' THEN 'missing_field'
    WHEN cap_type <> 'VARCHAR' THEN 'bad_type'
    -- a caption with a letter or digit left once <image> is removed is never blank: the Python rule
    -- (templates.clean_caption) only runs on the rest
    WHEN NOT regexp_matches(replace(caption_text, '<image>', ''), '[0-9A-Za-z]')
         AND ovis_blank_caption(caption_text) THEN 'empty_caption'
  END AS reason,
  CASE
    WHEN sample_type <> 'OBJECT' THEN 'the sample is ' || json_word(sample_type) || ', not an object'
    WHEN path_type = 'NULL' THEN 'no "image_path"'
    WHEN path_type <> 'VARCHAR' THEN '"image_path" is ' || json_word(path_type) || ', not a string'
    WHEN cap_type = 'NULL' THEN 'no "caption"'
    WHEN cap_type <> 'VARCHAR' THEN '"caption" is ' || json_word(cap_type) || ', not a string'
    WHEN NOT regexp_matches(replace(caption_text, '<image>', ''), '[0-9A-Za-z]')
         AND ovis_blank_caption(caption_text)
      THEN 'caption is empty once <image> and surrounding white space are removed'
  END AS detail
FROM d
"""


def _blank_captions(captions: pa.Array) -> pa.Array:
    """DuckDB UDF: the very rule pack applies (templates.clean_caption), on one vector of captions."""
    return pa.array([c is not None and not clean_caption(c) for c in captions.to_pylist()], pa.bool_())


def _register_udfs(con: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.CatalogException):  # already registered on this connection
        con.create_function(
            "ovis_blank_caption", _blank_captions, ["VARCHAR"], "BOOLEAN", type="arrow", side_effects=False
        )
    con.execute(_WORDS)


def _required(spec: DatasetSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(columns read, columns a parquet must have)."""
    if spec.data_format == "caption":
        return CAPTION_COLUMNS, ("image_path", "caption")
    return CONVERSATION_COLUMNS, ("conversations",)


def _load_source(con: duckdb.DuckDBPyConnection, spec: DatasetSpec, path: Path) -> bool:
    """meta_src: the typed read when every sample fits it, else (returns True) every sample as one
    JSON value."""
    columns, required = _required(spec)
    if _is_parquet(path):
        present = _parquet_columns(con, path)
        missing = [c for c in required if c not in present]
        if missing:
            raise MetaFileError(
                "meta_file_malformed",
                path,
                f"parquet lacks column(s) {', '.join(missing)} (has: {', '.join(sorted(present)) or 'none'})",
            )
    typed = TYPED_CONVERSATIONS if spec.data_format == "conversation" else None
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE meta_src AS {_source_sql(path, columns, con, typed)}")
        if typed is None or _is_parquet(path):
            return False
        # A turn with no "from" or "value" and one whose value is null read alike here: tell them apart.
        unsure = con.execute(
            """SELECT count(*) FROM meta_src WHERE
               list_bool_or([t IS NULL OR t."from" IS NULL OR t."value" IS NULL for t in conversations])"""
        ).fetchall()[0][0]
        if not unsure:
            return False
    except (duckdb.InvalidInputException, UnicodeDecodeError) as e:
        # DuckDB may cut its message inside a UTF-8 character (it quotes the sample): then the message
        # itself fails to decode, and its bytes are read here
        text = (e.object.decode("utf-8", "replace") if isinstance(e, UnicodeDecodeError) else str(e)).lower()
        if "transform error" not in text and "conversion" not in text:
            raise
    # Some sample does not fit the typed shape: read every sample as JSON to name it.
    con.execute(f"CREATE OR REPLACE TEMP TABLE meta_src AS {_generic_source_sql(path, columns)}")
    return True


def _check_shape(con: duckdb.DuckDBPyConnection, spec: DatasetSpec, path: Path) -> None:
    """No samples, or none that is an object with any of the expected fields: the file is not a meta
    file of this dataset's form (a list of numbers, an object of objects, an empty file)."""
    columns, _ = _required(spec)
    any_field = " OR ".join(f'"{c}" IS NOT NULL' for c in columns)
    total, fitting = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE sample_type = 'OBJECT' AND ({any_field})) FROM meta_src"
    ).fetchall()[0]
    if total == 0:
        size = path.stat().st_size
        what = "the file is empty (0 bytes)" if size == 0 else "the file holds no samples"
        raise MetaFileError("meta_file_empty", path, what)
    if fitting == 0:
        fields = ", ".join(f'"{c}"' for c in columns)
        form = "a parquet table" if _is_parquet(path) else "a JSON list of objects or one object per line"
        raise MetaFileError(
            "meta_file_malformed",
            path,
            f"none of its {total} entries is an object with any of {fields}: expected {form}",
        )


def load_meta(con: duckdb.DuckDBPyConnection, spec: DatasetSpec, path: Path) -> int:
    """Create the temp table `meta` for one dataset's meta file; returns its number of rows. Raises
    MetaFileError when the file as a whole cannot be used."""
    if not _is_parquet(path) and path.suffix.lower() not in (".json", ".jsonl", ".ndjson"):
        raise OvisDataError(
            f"{path}: unsupported meta file type {path.suffix!r} (use .json, .jsonl or .parquet)"
        )
    params: dict[str, object] = {"dataset": spec.name, "has_images": spec.image_dir is not None}
    _register_udfs(con)
    try:
        generic = _load_source(con, spec, path)
        _check_shape(con, spec, path)
        if spec.data_format == "caption":
            _run(con, [_CAPTION_SQL], params)
        else:
            # Parquet columns are JSON too (to_json): they take the generic path.
            turns = _TURNS_JSON if generic or _is_parquet(path) else _TURNS_TYPED
            _run(con, [_CONVERSATION_FINAL.format(turns=turns, text_types=TEXT_TYPES)], params)
        con.execute("DROP TABLE meta_src")
    except (
        duckdb.InvalidInputException,
        duckdb.IOException,
        duckdb.ConversionException,
        UnicodeDecodeError,
    ) as e:
        raise _malformed(path, e) from e
    # './a.jpg' names the same file as 'a.jpg': normalize once so joins and the catalog agree.
    # (a rewrite when some path needs it, not an UPDATE: DuckDB keeps updated rows in memory)
    dotted = "list_bool_or([starts_with(x, './') for x in images])"
    if con.execute(f"SELECT count(*) FROM meta WHERE {dotted}").fetchall()[0][0]:
        con.execute(
            r"""CREATE OR REPLACE TEMP TABLE meta AS
                SELECT * REPLACE ([regexp_replace(x, '^(\./)+', '') for x in images] AS images) FROM meta"""
        )
    return con.execute("SELECT count(*) FROM meta").fetchall()[0][0]
