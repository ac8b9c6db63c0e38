"""Breached-password checks: how often a password appears in known data breaches.

The port is :class:`BreachedPasswords` (one ``count`` call plus ``close``);
``hibp.mode`` picks an adapter (behaviour.md 2.2):

``off`` → :class:`NoBreachCheck`
    Every answer is ``None`` ("unknown"): the check is skipped.
``online`` → :class:`OnlineRangeClient`
    The Have I Been Pwned range API, used with k-anonymity: the password is
    NFKC-normalised and hashed with SHA-1, and only the first five hex digits
    of the hash leave the process. The service answers with every known hash
    suffix under that prefix (about a thousand), plus zero-count padding lines
    when asked with ``Add-Padding: true`` so that response sizes do not narrow
    the prefix down either. The match happens here, in memory. Nothing derived
    from the password (not even the prefix) is ever logged.
``offline`` → :class:`OfflineRangeFile`
    The same corpus downloaded as one ``SHA1:COUNT`` file ordered by hash,
    searched in place by binary search over byte offsets in a worker thread,
    so a file of tens of gigabytes costs a few dozen small reads per lookup
    and never blocks the event loop.

Failure policy (online): the check guards against weak passwords but must not
take signup and password changes down with a third-party API. With
``fail_open`` (the default) a timeout, refused connection, non-200 status or
malformed body makes the answer ``None``: the caller skips the check, and we
log a warning and report the failure kind (``timeout``, ``connect``,
``status``, ``malformed``) to ``on_failure`` for metrics. Without it the
failure raises :class:`~iam_grpc.errors.BackendUnavailable`.

Cache (online): ranges are public data, identical for every caller, so each
fetched range is kept in a bounded in-process LRU for ``cache_ttl`` (24 h by
default). Only ranges are cached, never per-password answers, so the process
holds no hash of any user's password after the call returns. A cached range
keeps the first 64 bits of each suffix and its count in two flat arrays
(about 12 bytes an entry): a full-size cache of 10,000 ranges of ~1,000
entries stays near 120 MB instead of the >1 GB a dict of strings would take.
A false match would need two of ~1,000 suffixes under one prefix to share
their first 64 bits (probability around 1e-16).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import ssl
import unicodedata
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Self
from urllib.parse import urlsplit

import h11

from iam_grpc.clock import Clock, SystemClock
from iam_grpc.errors import BackendUnavailable
from iam_grpc.logging import component_logger

if TYPE_CHECKING:
    from iam_grpc.config import HibpSettings

__all__ = [
    "BreachedPasswords",
    "NoBreachCheck",
    "OfflineRangeFile",
    "OnlineRangeClient",
    "breached_passwords",
]

log = component_logger("iam.hibp")

_PREFIX_LEN = 5
_SUFFIX_LEN = 35
_MAX_BODY = 1024 * 1024  # real ranges are ~40 KB; anything this big is not a range
_READ_CHUNK = 64 * 1024
_USER_AGENT = "iam-grpc"
_MAX_COUNT = 2**32 - 1  # cached counts are 32-bit; the most common password is seen ~50 million times
_RANGE_LINE = re.compile(rb"([0-9A-Fa-f]{35}):([0-9]{1,12})")

# Offline file lines: 40 hex digits, ':', a count, CRLF or LF. No real line is
# longer than this; the limit keeps a wrong file from being read whole by
# readline.
_FILE_LINE = re.compile(rb"([0-9A-Fa-f]{40}):([0-9]{1,12})\r?\n?")
_MAX_FILE_LINE = 256


class BreachedPasswords(Protocol):
    """How often a password was seen in known breaches."""

    async def count(self, password: str) -> int | None:
        """Times seen; ``0`` when not found; ``None`` when unknown (the check was skipped)."""
        ...

    async def close(self) -> None:
        """Release what the adapter holds."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None:
        """Close."""
        ...


class _Closing:
    """``async with`` closes the adapter."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        return None


def _sha1_hex(password: str) -> str:
    """Uppercase hex SHA-1 of the NFKC form: the corpus's key for the password as typed."""
    normalised = unicodedata.normalize("NFKC", password).encode("utf-8")
    # SHA-1 is the corpus's lookup key, not a protection of the password.
    return hashlib.sha1(normalised, usedforsecurity=False).hexdigest().upper()


class NoBreachCheck(_Closing):
    """Mode ``off``: the check is always skipped."""

    async def count(self, password: str) -> int | None:
        return None

    async def close(self) -> None:
        return None


class _RangeUnavailable(Exception):
    """Why one range fetch failed: ``kind`` for metrics, ``status`` when the server answered."""

    def __init__(self, kind: str, status: int | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.status = status


@dataclass(frozen=True, slots=True)
class _Range:
    """One prefix's breached suffixes: sorted 64-bit suffix heads and their counts."""

    heads: array[int]
    counts: array[int]
    expires_at: float

    def count(self, suffix: str) -> int:
        head = int(suffix[:16], 16)
        index = bisect_left(self.heads, head)
        if index < len(self.heads) and self.heads[index] == head:
            return self.counts[index]
        return 0


def _parse_range(body: bytes, expires_at: float) -> _Range:
    """Parse ``SUFFIX:COUNT`` lines; zero counts are padding and are dropped.

    Any other line makes the whole body malformed, and so does an empty one:
    every real prefix has hundreds of entries, and an empty 200 from a proxy
    must not quietly turn every password into "not breached".
    """
    entries: dict[int, int] = {}
    seen_lines = False
    for line in body.splitlines():
        if not line:
            continue
        match = _RANGE_LINE.fullmatch(line)
        if match is None:
            raise _RangeUnavailable("malformed")
        seen_lines = True
        count = int(match.group(2))
        if count:
            head = int(match.group(1)[:16], 16)
            entries[head] = max(count, entries.get(head, 0))
    if not seen_lines:
        raise _RangeUnavailable("malformed")
    heads = sorted(entries)
    counts = array("I", (min(entries[head], _MAX_COUNT) for head in heads))
    return _Range(array("Q", heads), counts, expires_at)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    host: str
    port: int
    host_header: str
    path: str
    tls: bool


def _endpoint(url: str) -> _Endpoint:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("hibp.url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("hibp.url must not carry credentials")
    if parts.query or parts.fragment:
        raise ValueError("hibp.url must not have a query or fragment")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    path = parts.path or "/"
    if not path.endswith("/"):
        path += "/"
    # api.md: requests go to <url>/range/<prefix>. The default and many settings already name the
    # range path itself; both forms are accepted.
    if not path.endswith("/range/"):
        path += "range/"
    return _Endpoint(parts.hostname, port, parts.netloc, path, tls)


class OnlineRangeClient(_Closing):
    """Mode ``online``: the k-anonymity range API, with a range cache and a fail-open policy.

    One short-lived HTTP/1.1 connection per range fetch (``Connection: close``):
    with a 24 h cache, fetches are rare enough that pooling would buy little.
    Redirects are not followed; a 3xx is a ``status`` failure like any non-200.
    ``on_failure`` and the warning fire on every failure, fail-open or not, so
    the failure metric does not go quiet when an operator switches to fail-closed.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: timedelta,
        cache_ttl: timedelta,
        fail_open: bool = True,
        cache_size: int = 1_000,  # ~12 KiB per cached range
        on_failure: Callable[[str], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Clock | None = None,
    ) -> None:
        if timeout <= timedelta(0):
            raise ValueError("hibp timeout must be positive")
        if cache_ttl < timedelta(0):
            raise ValueError("hibp cache_ttl must not be negative")
        if cache_size < 0:
            raise ValueError("hibp cache_size must not be negative")
        self._endpoint = _endpoint(url)
        self._timeout = timeout.total_seconds()
        self._cache_ttl = cache_ttl.total_seconds()
        self._fail_open = fail_open
        self._cache_size = cache_size
        self._on_failure = on_failure
        self._ssl: ssl.SSLContext | None = None
        if self._endpoint.tls:
            self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._cache: OrderedDict[str, _Range] = OrderedDict()

    @property
    def url(self) -> str:
        """The normalised range URL the prefix is appended to."""
        scheme = "https" if self._endpoint.tls else "http"
        return f"{scheme}://{self._endpoint.host_header}{self._endpoint.path}"

    async def count(self, password: str) -> int | None:
        digest = _sha1_hex(password)
        prefix, suffix = digest[:_PREFIX_LEN], digest[_PREFIX_LEN:]
        found = self._cached(prefix)
        if found is None:
            try:
                found = await self._fetch(prefix)
            except _RangeUnavailable as failure:
                self._failed(failure)
                return None
            self._remember(prefix, found)
        return found.count(suffix)

    async def close(self) -> None:
        self._cache.clear()

    def _cached(self, prefix: str) -> _Range | None:
        found = self._cache.get(prefix)
        if found is None:
            return None
        if found.expires_at <= self._clock.monotonic():
            del self._cache[prefix]
            return None
        self._cache.move_to_end(prefix)
        return found

    def _remember(self, prefix: str, found: _Range) -> None:
        if self._cache_size == 0 or self._cache_ttl == 0:
            return
        self._cache[prefix] = found
        self._cache.move_to_end(prefix)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _failed(self, failure: _RangeUnavailable) -> None:
        # Bound fields only: the failure kind and the HTTP status, nothing from the password.
        log.bind(failure=failure.kind, status=failure.status, fail_open=self._fail_open).warning(
            "breached-password check failed"
        )
        if self._on_failure is not None:
            self._on_failure(failure.kind)
        if not self._fail_open:
            raise BackendUnavailable() from failure

    async def _fetch(self, prefix: str) -> _Range:
        try:
            async with asyncio.timeout(self._timeout):
                body = await self._get(self._endpoint.path + prefix)
        except TimeoutError as exc:
            raise _RangeUnavailable("timeout") from exc
        return _parse_range(body, self._clock.monotonic() + self._cache_ttl)

    async def _get(self, target: str) -> bytes:
        """One GET over a fresh connection; the body of a 200, or :class:`_RangeUnavailable`."""
        endpoint = self._endpoint
        try:
            reader, writer = await asyncio.open_connection(
                endpoint.host,
                endpoint.port,
                ssl=self._ssl,
                server_hostname=endpoint.host if endpoint.tls else None,
            )
        except OSError as exc:  # refused, unreachable, DNS, TLS handshake
            raise _RangeUnavailable("connect") from exc
        try:
            return await self._exchange(reader, writer, target)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str
    ) -> bytes:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=target,
            headers=[
                ("Host", self._endpoint.host_header),
                ("User-Agent", _USER_AGENT),
                ("Add-Padding", "true"),
                ("Accept", "text/plain"),
                ("Connection", "close"),
            ],
        )
        body = bytearray()
        eof = False
        try:
            writer.write(conn.send(request) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(_READ_CHUNK)
                    eof = not data
                    conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    if event.status_code != 200:
                        raise _RangeUnavailable("status", event.status_code)
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > _MAX_BODY:
                        raise _RangeUnavailable("malformed")
                elif isinstance(event, h11.EndOfMessage):
                    return bytes(body)
                elif isinstance(event, h11.ConnectionClosed):
                    raise _RangeUnavailable("connect")
                # InformationalResponse (1xx): keep reading for the real response.
        except h11.RemoteProtocolError as exc:
            # The peer hanging up early is a connection failure; bytes that are not HTTP are not.
            raise _RangeUnavailable("connect" if eof else "malformed") from exc
        except OSError as exc:
            raise _RangeUnavailable("connect") from exc


class OfflineRangeFile(_Closing):
    """Mode ``offline``: a local ``SHA1HEX:COUNT`` file ordered by hash (the HIBP download).

    The file is opened per lookup, in a worker thread, and searched by
    bisection over byte offsets: land anywhere, skip to the next line start,
    compare that line's hash. Opening per lookup keeps no descriptor shared
    between threads and picks up a file replaced in place.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        try:
            with self._path.open("rb") as handle:
                first = handle.readline(_MAX_FILE_LINE)
        except OSError as exc:
            raise ValueError(f"hibp.file {self._path} cannot be read: {exc.strerror or exc}") from exc
        if not first:
            raise ValueError(f"hibp.file {self._path} is empty")
        if _FILE_LINE.fullmatch(first) is None:
            raise ValueError(f"hibp.file {self._path} is not a SHA1:COUNT file (first line does not match)")

    @property
    def path(self) -> Path:
        return self._path

    async def count(self, password: str) -> int | None:
        digest = _sha1_hex(password).encode("ascii")
        try:
            return await asyncio.to_thread(self._search, digest)
        except OSError as exc:
            log.bind(failure="file").warning("breached-password file unreadable")
            raise BackendUnavailable() from exc

    async def close(self) -> None:
        return None

    def _search(self, digest: bytes) -> int:
        with self._path.open("rb") as handle:
            size = handle.seek(0, 2)

            def line_at_or_after(offset: int) -> bytes:
                """The first whole line starting at or after ``offset`` (b"" at the end)."""
                if offset == 0:
                    handle.seek(0)
                else:
                    # Stepping back one byte makes a line start exactly at ``offset`` count.
                    handle.seek(offset - 1)
                    handle.readline(_MAX_FILE_LINE)
                return handle.readline(_MAX_FILE_LINE)

            # Smallest offset whose next line has a hash >= digest; the end of file counts as +inf.
            low, high = 0, size
            while low < high:
                middle = (low + high) // 2
                line = line_at_or_after(middle)
                if not line or line[:40].upper() >= digest:
                    high = middle
                else:
                    low = middle + 1
            line = line_at_or_after(low)
        match = _FILE_LINE.fullmatch(line)
        if match is None or match.group(1).upper() != digest:
            return 0
        return int(match.group(2))


def breached_passwords(
    settings: HibpSettings, *, on_failure: Callable[[str], None] | None = None
) -> BreachedPasswords:
    """The adapter ``settings.mode`` asks for (``None`` counts as ``off``)."""
    mode = settings.mode or "off"
    if mode == "off":
        return NoBreachCheck()
    if mode == "online":
        return OnlineRangeClient(
            settings.url,
            timeout=settings.timeout,
            cache_ttl=settings.cache_ttl,
            fail_open=settings.fail_open,
            on_failure=on_failure,
        )
    if mode == "offline":
        if settings.file is None:
            raise ValueError("hibp.mode = 'offline' needs hibp.file (the SHA1:COUNT file ordered by hash)")
        return OfflineRangeFile(settings.file)
    raise ValueError(f"unknown hibp.mode {mode!r}")
