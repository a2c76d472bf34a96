"""Stable snake_case outcome classes of a row, and which of them are worth another try."""

from __future__ import annotations

SUCCESS = "success"

# Failure classes (stable names: they appear in status parquets and JSON reports).
HTTP_404 = "http_404"
HTTP_4XX = "http_4xx"  # any other client error (403, 410, ...)
HTTP_429 = "http_429"
HTTP_5XX = "http_5xx"
HTTP_OTHER = "http_other"  # a status that is neither success, redirect nor error (204, 3xx without Location)
TIMEOUT = "timeout"
CONNECTION_RESET = "connection_reset"
CONNECTION_REFUSED = "connection_refused"
CONNECTION_ERROR = "connection_error"
DNS_ERROR = "dns_error"
SSL_ERROR = "ssl_error"
TRUNCATED = "truncated"
NOT_IMAGE = "not_image"
TOO_LARGE = "too_large"
OPTED_OUT = "opted_out"
REDIRECT_LOOP = "redirect_loop"
TOO_MANY_REDIRECTS = "too_many_redirects"
PRIVATE_ADDRESS = "private_address"
UNSUPPORTED_SCHEME = "unsupported_scheme"
INVALID_URL = "invalid_url"
MISSING_URL = "missing_url"
BAD_PATH = "bad_path"
DECODE_ERROR = "decode_error"
DECOMPRESSION_BOMB = "decompression_bomb"
HASH_MISMATCH = "hash_mismatch"
WATCHDOG = "watchdog"
WORKER_CRASH = "worker_crash"

# Retried inside a run, with exponential backoff: the server or the path may well answer next time.
RETRY_NOW = frozenset({TIMEOUT, CONNECTION_RESET, HTTP_429, HTTP_5XX, TRUNCATED})
# Re-attempted by `--retry-failed`: the above plus failures of the moment (DNS, refused, stuck rows).
RETRY_LATER = RETRY_NOW | frozenset({DNS_ERROR, CONNECTION_REFUSED, CONNECTION_ERROR, WATCHDOG, WORKER_CRASH})
