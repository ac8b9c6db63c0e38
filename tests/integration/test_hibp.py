"""Breached-password adapters against a real range server and real files."""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from loguru import logger

from iam_grpc.clock import ManualClock
from iam_grpc.config import HibpSettings
from iam_grpc.errors import BackendUnavailable
from iam_grpc.hibp import NoBreachCheck, OfflineRangeFile, OnlineRangeClient, breached_passwords
from tests.hibp_server import RangeServer, sha1_hex

FAST = timedelta(milliseconds=250)
DAY = timedelta(hours=24)


@pytest.fixture(scope="module")
def range_server() -> Iterator[RangeServer]:
    server = RangeServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hibp(range_server: RangeServer) -> RangeServer:
    range_server.reset()
    return range_server


def online(server: RangeServer, **options: Any) -> OnlineRangeClient:
    options.setdefault("timeout", FAST)
    options.setdefault("cache_ttl", DAY)
    return OnlineRangeClient(server.url, **options)


# --- online: answers --------------------------------------------------------------------------------


async def test_online_hit_returns_the_breach_count(hibp: RangeServer) -> None:
    """A password in the range answers with its breach count."""
    hibp.add("correct horse battery staple", 1234)
    client = online(hibp)
    assert await client.count("correct horse battery staple") == 1234
    await client.close()


async def test_online_miss_returns_zero(hibp: RangeServer) -> None:
    """A password absent from its range answers 0."""
    client = online(hibp)
    assert await client.count("Xq7!never-breached-passphrase") == 0
    await client.close()


async def test_online_zero_count_padding_lines_are_ignored(hibp: RangeServer) -> None:
    """Padding lines (count 0) never count as breaches nor overwrite a real count."""
    digest = hibp.add("sunshine-and-rain", 42)
    absent = sha1_hex("padded-but-not-breached")
    hibp.extra_padding = [digest[5:], absent[5:]]
    client = online(hibp)
    assert await client.count("sunshine-and-rain") == 42
    assert await client.count("padded-but-not-breached") == 0
    await client.close()


async def test_online_sends_only_the_five_char_prefix(hibp: RangeServer) -> None:
    """Only the first 5 hex digits of the hash leave the process, with Add-Padding and our User-Agent."""
    digest = hibp.add("my secret password", 7)
    client = online(hibp)
    await client.count("my secret password")
    [request] = hibp.requests
    assert request.path == "/range/" + digest[:5]
    assert request.headers["add-padding"] == "true"
    assert request.headers["user-agent"] == "iam-grpc"
    sent = (request.path + repr(request.headers)).upper()
    assert digest[5:] not in sent
    assert digest[5:15] not in sent
    assert "MY SECRET PASSWORD" not in sent
    await client.close()


async def test_online_hashes_the_nfkc_form(hibp: RangeServer) -> None:
    """Compatibility forms (full-width letters) hash like the plain password."""
    hibp.add("password", 9_000_000)
    client = online(hibp)
    assert await client.count("ｐａｓｓｗｏｒｄ") == 9_000_000
    await client.close()


async def test_online_reads_lf_line_endings(hibp: RangeServer) -> None:
    """A range with LF line endings parses like one with CRLF."""
    hibp.add("lf-only-password", 3)
    hibp.newline = "\n"
    client = online(hibp)
    assert await client.count("lf-only-password") == 3
    await client.close()


async def test_online_reads_a_chunked_body(hibp: RangeServer) -> None:
    """A range sent with chunked transfer encoding is reassembled."""
    hibp.add("chunked-password", 11)
    hibp.padding = 600
    hibp.chunked = True
    client = online(hibp)
    try:
        assert await client.count("chunked-password") == 11
    finally:
        hibp.padding = 25
        await client.close()


# --- online: cache ----------------------------------------------------------------------------------


async def test_online_cache_answers_a_repeat_without_a_request(hibp: RangeServer) -> None:
    """A second lookup in a cached range makes no request."""
    hibp.add("cached-password", 5)
    client = online(hibp)
    assert await client.count("cached-password") == 5
    assert await client.count("cached-password") == 5
    assert len(hibp.requests) == 1
    await client.close()


async def test_online_cache_expires_after_its_ttl(hibp: RangeServer) -> None:
    """Once cache_ttl has passed, the range is fetched again."""
    hibp.add("short-lived", 5)
    clock = ManualClock()
    client = online(hibp, cache_ttl=timedelta(seconds=1), clock=clock)
    await client.count("short-lived")
    clock.advance(timedelta(milliseconds=999))
    await client.count("short-lived")
    assert len(hibp.requests) == 1
    clock.advance(timedelta(milliseconds=1))
    assert await client.count("short-lived") == 5
    assert len(hibp.requests) == 2
    await client.close()


async def test_online_cache_evicts_the_least_recently_used_range(hibp: RangeServer) -> None:
    """With cache_size ranges held, a new prefix pushes out the least recently used one."""
    first, second = "first-password", "second-password"
    assert sha1_hex(first)[:5] != sha1_hex(second)[:5]
    client = online(hibp, cache_size=1)
    await client.count(first)
    await client.count(second)
    await client.count(second)
    await client.count(first)
    assert [r.path[-5:] for r in hibp.requests] == [sha1_hex(p)[:5] for p in (first, second, first)]
    await client.close()


async def test_online_failures_are_not_cached(hibp: RangeServer) -> None:
    """After a failed fetch the next lookup asks again."""
    hibp.mode = "status"
    client = online(hibp)
    assert await client.count("retry-me") is None
    hibp.mode = "normal"
    assert await client.count("retry-me") == 0
    assert len(hibp.requests) == 2
    await client.close()


# --- online: failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("slow", "timeout"),
        ("status", "status"),
        ("malformed", "malformed"),
        ("huge", "malformed"),
        ("closed", "connect"),
    ],
)
async def test_online_failure_fails_open(hibp: RangeServer, mode: str, kind: str) -> None:
    """With fail_open, every failure answers None and reports its kind to on_failure."""
    hibp.mode = mode
    kinds: list[str] = []
    client = online(hibp, on_failure=kinds.append)
    started = time.monotonic()
    assert await client.count("any-password") is None
    assert kinds == [kind]
    assert time.monotonic() - started < FAST.total_seconds() + 0.5
    await client.close()


async def test_online_refused_connection_fails_open() -> None:
    """A port with no listener is a connect failure."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kinds: list[str] = []
    client = OnlineRangeClient(
        f"http://127.0.0.1:{port}/range/", timeout=FAST, cache_ttl=DAY, on_failure=kinds.append
    )
    assert await client.count("any-password") is None
    assert kinds == ["connect"]
    await client.close()


async def test_online_redirect_is_not_followed(hibp: RangeServer) -> None:
    """A 3xx answer is a status failure; the Location is never requested."""
    hibp.mode = "status"
    hibp.status_code = 302
    kinds: list[str] = []
    client = online(hibp, on_failure=kinds.append)
    assert await client.count("any-password") is None
    assert kinds == ["status"]
    assert len(hibp.requests) == 1
    await client.close()


@pytest.mark.parametrize("mode", ["slow", "status", "malformed", "closed"])
async def test_online_failure_fails_closed(hibp: RangeServer, mode: str) -> None:
    """Without fail_open, a failure raises BackendUnavailable (and is still reported)."""
    hibp.mode = mode
    kinds: list[str] = []
    client = online(hibp, fail_open=False, on_failure=kinds.append)
    with pytest.raises(BackendUnavailable):
        await client.count("any-password")
    assert len(kinds) == 1
    await client.close()


async def test_online_failure_log_carries_no_password_data(hibp: RangeServer) -> None:
    """The failure warning has a constant message and only the kind and status as fields."""
    hibp.mode = "status"
    digest = sha1_hex("logged-password?")
    records: list[Any] = []
    sink = logger.add(lambda message: records.append(message.record), level="WARNING")
    try:
        client = online(hibp)
        await client.count("logged-password?")
        await client.close()
    finally:
        logger.remove(sink)
    [record] = [r for r in records if r["extra"].get("logger") == "iam.hibp"]
    assert record["message"] == "breached-password check failed"
    assert record["extra"]["failure"] == "status"
    assert record["extra"]["status"] == 503
    text = repr(record).upper()
    assert digest[:5] not in text
    assert digest[5:15] not in text
    assert "LOGGED-PASSWORD" not in text


@pytest.mark.parametrize(
    ("configured", "ranges_at"),
    [
        ("http://127.0.0.1:8080/range", "http://127.0.0.1:8080/range/"),
        ("http://127.0.0.1:8080/range/", "http://127.0.0.1:8080/range/"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/range/"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/range/"),
        ("https://mirror.example/hibp", "https://mirror.example/hibp/range/"),
        ("https://mirror.example/hibp/range/", "https://mirror.example/hibp/range/"),
    ],
)
def test_online_url_is_the_base_or_the_range_path(configured: str, ranges_at: str) -> None:
    """api.md: requests go to <url>/range/<5 hex>; a URL that already ends with range/ is taken
    as the range path itself (the default does), any other gets range/ appended."""
    assert OnlineRangeClient(configured, timeout=FAST, cache_ttl=DAY).url == ranges_at


def test_online_url_is_normalised_and_validated() -> None:
    """The range URL always ends with '/'; non-HTTP URLs are refused at construction."""
    client = OnlineRangeClient("http://127.0.0.1:8080/range", timeout=FAST, cache_ttl=DAY)
    assert client.url == "http://127.0.0.1:8080/range/"
    with pytest.raises(ValueError, match="http"):
        OnlineRangeClient("ftp://example.com/range/", timeout=FAST, cache_ttl=DAY)
    with pytest.raises(ValueError, match="timeout"):
        OnlineRangeClient("https://example.com/range/", timeout=timedelta(0), cache_ttl=DAY)


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_server(tls_ca: trustme.CA) -> Iterator[RangeServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(context)
    server = RangeServer(tls=context)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_online_https_verifies_the_server(tls_server: RangeServer, tls_ca: trustme.CA) -> None:
    """Over https the range is fetched from a server whose certificate the context trusts."""
    tls_server.reset()
    tls_server.add("tls-password", 21)
    trusting = ssl.create_default_context()
    tls_ca.configure_trust(trusting)
    client = online(tls_server, ssl_context=trusting)
    assert client.url.startswith("https://")
    assert await client.count("tls-password") == 21
    await client.close()


async def test_online_https_untrusted_certificate_is_a_connect_failure(tls_server: RangeServer) -> None:
    """A certificate outside the default trust store fails the check as a connect failure."""
    tls_server.reset()
    kinds: list[str] = []
    client = online(tls_server, on_failure=kinds.append)
    assert await client.count("tls-password") is None
    assert kinds == ["connect"]
    assert tls_server.requests == []
    await client.close()


# --- offline ----------------------------------------------------------------------------------------


def write_corpus(
    path: Path, passwords: dict[str, int], newline: str = "\r\n", final_newline: bool = True
) -> list[str]:
    """Write ``HASH:COUNT`` lines ordered by hash; returns the hashes in file order."""
    lines = sorted(f"{sha1_hex(p)}:{c}" for p, c in passwords.items())
    path.write_bytes((newline.join(lines) + (newline if final_newline else "")).encode("ascii"))
    return [line[:40] for line in lines]


@pytest.fixture
def small_corpus(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    passwords = {f"offline-{i}": i + 1 for i in range(50)}
    path = tmp_path / "pwned.txt"
    write_corpus(path, passwords)
    return path, passwords


async def test_offline_hit_returns_the_count(small_corpus: tuple[Path, dict[str, int]]) -> None:
    """A password in the file answers with its count."""
    path, passwords = small_corpus
    corpus = OfflineRangeFile(path)
    for password, count in passwords.items():
        assert await corpus.count(password) == count
    await corpus.close()


async def test_offline_miss_returns_zero(small_corpus: tuple[Path, dict[str, int]]) -> None:
    """A password absent from the file answers 0, below, between and above its hashes."""
    path, _ = small_corpus
    corpus = OfflineRangeFile(path)
    for password in ("not-in-file", "offline-50", "", "ＯＦＦＬＩＮＥ-zz"):
        assert await corpus.count(password) == 0
    await corpus.close()


@pytest.mark.parametrize(("newline", "final_newline"), [("\r\n", True), ("\n", True), ("\n", False)])
async def test_offline_finds_first_and_last_lines(tmp_path: Path, newline: str, final_newline: bool) -> None:
    """The first and last lines are found, with CRLF, LF and no final line break."""
    passwords = {f"edge-{i}": 100 + i for i in range(20)}
    path = tmp_path / "edges.txt"
    order = write_corpus(path, passwords, newline, final_newline)
    by_hash = {sha1_hex(p): (p, c) for p, c in passwords.items()}
    corpus = OfflineRangeFile(path)
    for digest in (order[0], order[-1]):
        password, count = by_hash[digest]
        assert await corpus.count(password) == count


async def test_offline_single_line_file(tmp_path: Path) -> None:
    """A one-line file answers for its line and 0 for anything else."""
    path = tmp_path / "one.txt"
    write_corpus(path, {"only-one": 77})
    corpus = OfflineRangeFile(path)
    assert await corpus.count("only-one") == 77
    assert await corpus.count("another") == 0


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A 200,000-line corpus (about 9 MB) and its size in bytes."""
    path = tmp_path_factory.mktemp("hibp") / "big.txt"
    write_corpus(path, {f"big-{i}": i + 1 for i in range(200_000)})
    return path, path.stat().st_size


def bytes_read_by_process() -> int:
    with open("/proc/self/io") as io:
        return int(next(line for line in io if line.startswith("rchar:")).split()[1])


async def test_offline_big_file_is_searched_not_read(big_corpus: tuple[Path, int]) -> None:
    """Lookups in a 200,000-line file are right, fast, and read a tiny part of it."""
    path, size = big_corpus
    corpus = OfflineRangeFile(path)
    probes = {f"big-{i}": i + 1 for i in (0, 1, 4_999, 123_456, 199_999)}
    probes |= {"big-200000": 0, "not-there": 0}
    await corpus.count("warm-up")
    before, started = bytes_read_by_process(), time.perf_counter()
    for password, count in probes.items():
        assert await corpus.count(password) == count
    elapsed, read = time.perf_counter() - started, bytes_read_by_process() - before
    assert elapsed / len(probes) < 0.02
    assert read < size / 10


def test_offline_file_problems_are_refused_at_construction(tmp_path: Path) -> None:
    """A missing, empty or foreign file is a ValueError naming the path."""
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        OfflineRangeFile(missing)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        OfflineRangeFile(empty)
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("password\n123456\n")
    with pytest.raises(ValueError, match=re.escape(str(foreign))):
        OfflineRangeFile(foreign)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        OfflineRangeFile(tmp_path)


# --- factory ----------------------------------------------------------------------------------------


async def test_factory_off_and_unset_skip_the_check() -> None:
    """Mode off, and no mode at all, give the adapter that always answers None."""
    for mode in ("off", None):
        adapter = breached_passwords(HibpSettings(mode=mode))
        assert isinstance(adapter, NoBreachCheck)
        assert await adapter.count("password") is None
        await adapter.close()


def test_factory_online_uses_the_configured_url() -> None:
    """Mode online gives the range client on hibp.url."""
    adapter = breached_passwords(HibpSettings(mode="online", url="http://127.0.0.1:9/range"))
    assert isinstance(adapter, OnlineRangeClient)
    assert adapter.url == "http://127.0.0.1:9/range/"


def test_factory_offline_uses_the_file(small_corpus: tuple[Path, dict[str, int]]) -> None:
    """Mode offline gives the file adapter on hibp.file."""
    path, _ = small_corpus
    adapter = breached_passwords(HibpSettings(mode="offline", file=path))
    assert isinstance(adapter, OfflineRangeFile)
    assert adapter.path == path


def test_factory_offline_without_a_file_is_refused() -> None:
    """Mode offline with no hibp.file is a ValueError that says what is missing."""
    with pytest.raises(ValueError, match=r"hibp\.file"):
        breached_passwords(HibpSettings(mode="offline"))
