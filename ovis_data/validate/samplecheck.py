"""Per-sample checks of a meta file, as DuckDB SQL: from `meta_src` (each sample's fields as read by
metafile.py) to the table `meta`, each sample with its reason and detail (docs/meta-files.md lists them).

A caption's blankness is decided by the rule pack applies (constants.clean_caption), run as a UDF.
"""

from __future__ import annotations

import contextlib

import duckdb
import pyarrow as pa

from ..constants import clean_caption

# JSON types a turn value may have: text, or a number (read as its text).
TEXT_TYPES = "('VARCHAR', 'BIGINT', 'UBIGINT', 'DOUBLE')"

# How a JSON type reads in a detail.
_WORDS = """
CREATE OR REPLACE TEMP MACRO json_word(t) AS CASE coalesce(t, 'NULL')
  WHEN 'VARCHAR' THEN 'a string' WHEN 'ARRAY' THEN 'a list' WHEN 'OBJECT' THEN 'an object'
  WHEN 'NULL' THEN 'null' WHEN 'BOOLEAN' THEN 'a boolean' ELSE 'a number' END
"""

# The scan is materialized on its own: numbering rows needs the whole input, and extracting in the
# same statement ran single-threaded and 3x slower. Each JSON value is then parsed once.
TURNS_TYPED = """
SELECT row, sample_type, id AS id_json, image AS image_json, json_type(image) AS image_type,
  CASE WHEN conversations IS NULL THEN 'NULL' ELSE 'ARRAY' END AS conv_type,
  len(conversations) AS n_turns,
  NULL::INTEGER AS bad_turn, NULL::VARCHAR AS bad_turn_type, NULL::INTEGER AS missing_turn,
  NULL::VARCHAR AS missing_key,
  [t."from" for t in conversations] AS roles,
  [t."value" for t in conversations] AS values_json
FROM meta_src
"""

TURNS_JSON = """
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

CONVERSATION_SQL = """
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

CAPTION_SQL = """
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
    -- (constants.clean_caption) only runs on the rest
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
    """DuckDB UDF: the very rule pack applies (constants.clean_caption), on one vector of captions."""
    return pa.array([c is not None and not clean_caption(c) for c in captions.to_pylist()], pa.bool_())


def register_udfs(con: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.CatalogException):  # already registered on this connection
        con.create_function(
            "ovis_blank_caption", _blank_captions, ["VARCHAR"], "BOOLEAN", type="arrow", side_effects=False
        )
    con.execute(_WORDS)
