"""Where a serving process spends its time under load (issue 14): py-spy profiles and a summary.

Usage: python bench/profile.py [--seconds S] [--cases health,verify,authz,login,refresh]
                               [--server prod1|emb1] [--out DIR] [--python-only]
       python bench/profile.py --summarise DIR/case.txt [...]

py-spy is a bench tool, not a dependency: ``.venv/bin/pip install py-spy`` (it attaches with
ptrace: run as root or with CAP_SYS_PTRACE).

One server (default: production mode on MariaDB + Redis, one worker, so one process holds the
whole service; bench/unary.py's setup) is loaded case by case, and py-spy samples it for S seconds
at 100 Hz in the middle of the load, with native frames (grpc's Cython and C core, protobuf's upb,
libargon2 are visible) and one stack per thread. Loads: h2load for Health/Check,
VerifyAccessToken and ext_authz Check (as bench/unary.py: -c 8 -m 16); bench/flows.py's Python
clients for Login (16 clients) and Refresh (32 chains).

Each raw profile (collapsed stacks in ``DIR/<server>-<case>.txt``, DIR by default var/profiles;
flamegraph.pl and speedscope read them) is summarised in ``DIR/<server>-<case>.json`` and printed:
- per thread: busy cores (samples ÷ rate ÷ seconds; samples waiting in epoll/futex left out);
- main thread (the event loop, the one that saturates): the share of its busy samples by the
  component that runs at the leaf (the first frame from the leaf that is not asyncio or libc
  plumbing), and by the deepest iam_grpc function on the stack (what our code costs, with the
  libraries it calls, apart from what it wraps);
- inclusive shares of named parts (any frame on the stack): the interceptor chain's own code,
  logging, metrics, the deny-list round trip, JWT decode, protobuf, SQL, argon2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from _h2load import delta, grpc_frame, h2load, scrape, summed  # type: ignore[import-not-found]
from flows import accounts_on, login_load, refresh_load  # type: ignore[import-not-found]
from unary import (  # type: ignore[import-not-found]
    Server,
    Target,
    own_database,
    production_env,
    start_iam,
    targets_for,
)

RATE = 100
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*)\)$")
# Leaf frames that mean "blocked, not using the CPU" (native stacks include them even without --idle).
WAITING = (
    "epoll_wait",
    "epoll_pwait",
    "poll",
    "select",
    "futex",
    "pthread_cond",
    "nanosleep",
    "sem_wait",
    "syscall",
    "PyThread_acquire_lock",
    "_queue_SimpleQueue_get",
    "time_sleep",
)
# iam_grpc frames that only start the process (every sample has them)
ENTRY = ("iam_grpc/process.py", "iam_grpc/cli/", "iam_grpc/__main__.py", "bin/iam-grpc")
LOOP = "event loop, and grpc's Cython/C when no native frames"
# Plumbing: skipped when looking for the component that does the work.
GENERIC = (
    "asyncio/",
    "selectors.py",
    "threading.py",
    "concurrent/",
    "contextvars",
    "functools.py",
    "libc.so",
    "libpython",
    "_asynciomodule.c",
    "[vdso]",
    "?",
    "ld-linux",
    "libm.so",
    "libstdc++",
    "libgcc",
    "runners.py",
    "object.h",
    "<frozen",
    "<string>",
    "typer/",
    "click/",
    "contextlib.py",
)


def component(where: str) -> str | None:
    """The component a frame belongs to; None for plumbing."""
    rules = (
        (("argon2", "_ffi"), "argon2"),
        (("google/protobuf", "_message", "upb"), "protobuf"),
        (("jwt/", "cryptography", "_rust.abi3"), "JWT + crypto"),
        (("loguru/", "iam_grpc/logging.py"), "logging (loguru)"),
        (("prometheus_client/",), "metrics (prometheus_client)"),
        (("redis/",), "redis-py"),
        (("sqlalchemy/",), "SQLAlchemy"),
        (("asyncmy",), "asyncmy (MySQL protocol)"),
        (("sqlite",), "sqlite"),
        (("user_agents", "ua_parser"), "UA parser"),
        (("json/", "_json"), "json"),
        (("pydantic",), "pydantic"),
        (("socketmodule.c",), "socket send/recv (Python sockets: Redis, MySQL)"),
    )
    for needles, name in rules:
        if any(n in where for n in needles):
            return name
    if "iam_grpc/" in where:
        return "iam_grpc " + where.split("iam_grpc/", 1)[1].split(":", 1)[0]
    if "grpc/" in where or "cygrpc" in where or "grpc_" in where:
        return "grpc (aio Cython + C core)"
    if any(g in where for g in GENERIC):
        return None
    return "other: " + short(where)


def short(where: str) -> str:
    """A path without the interpreter's or the venv's prefix, and without the line number."""
    path = where.split(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", "/work/wt/i14bench/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path.rsplit("/", 1)[-1]


def parse(line: str) -> tuple[str, list[tuple[str, str]], int] | None:
    """One collapsed stack: thread, frames (function, where) root first, count."""
    stack, _, count = line.rstrip().rpartition(" ")
    if not stack or not count.isdigit():
        return None
    parts = stack.split(";")
    thread = parts[0]
    frames = []
    for part in parts[1:]:
        match = _FRAME.match(part)
        frames.append((match["func"], match["where"]) if match else (part, "?"))
    return thread, frames, int(count)


# Named parts for the inclusive view: a sample counts when any frame matches.
PARTS = {
    "interceptor chain (iam_grpc/interceptors/*, own code and callees, not the servicer)": None,
    "logging (loguru, iam_grpc/logging.py)": ("loguru/", "iam_grpc/logging.py"),
    "metrics (prometheus_client)": ("prometheus_client/",),
    "deny-list check (core/tokens/denylist.py, incl. Redis round trip)": ("core/tokens/denylist.py",),
    "redis-py (any caller)": ("redis/",),
    "JWT decode (access.py decode, PyJWT, cryptography)": ("jwt/", "cryptography", "_rust.abi3"),
    "protobuf (any caller)": ("google/protobuf", "_message", "upb"),
    "SQL (SQLAlchemy, asyncmy, sqlite)": ("sqlalchemy/", "asyncmy", "sqlite"),
    "argon2": ("argon2",),
    "servicers (iam_grpc/services/*)": ("iam_grpc/services/",),
    "audit trail (core/audit.py)": ("iam_grpc/core/audit",),
    "anomaly checks (core/anomalies)": ("iam_grpc/core/anomalies",),
    "rate limiter (core/ratelimit + storage)": (
        "iam_grpc/core/ratelimit",
        "sliding_window",
        "RedisLimiterStore",
    ),
    "UA parser": ("user_agents", "ua_parser", "iam_grpc/ua.py"),
}


def summarise(path: Path, seconds: float, rate: int = RATE) -> dict[str, Any]:
    threads: Counter[str] = Counter()
    waiting: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    deepest: Counter[str] = Counter()
    deepest_libs: dict[str, Counter[str]] = defaultdict(Counter)
    inclusive: Counter[str] = Counter()
    main_busy = 0
    for line in path.read_text().splitlines():
        parsed = parse(line)
        if parsed is None:
            continue
        thread, frames, count = parsed
        name = thread.split(": ", 1)[-1]
        if any(marker in func and ".py:" not in where for func, where in frames[-6:] for marker in WAITING):
            waiting[name] += count
            continue
        threads[name] += count
        if name != "MainThread":
            continue
        main_busy += count
        owner = "outside iam_grpc"
        library = None
        for func, where in reversed(frames):
            found = component(where)
            if found is None or any(e in where for e in ENTRY):
                continue
            if library is None and not found.startswith("iam_grpc"):
                library = found
            if found.startswith("iam_grpc"):
                owner = f"{func} ({found.removeprefix('iam_grpc ')})"
                break
        if library is None:
            # no library between the leaf and our code (or the root): our own Python, or the loop
            library = "own Python code" if owner != "outside iam_grpc" else LOOP
        first = next(
            (
                c
                for _, w in reversed(frames)
                if (c := component(w)) is not None and not any(e in w for e in ENTRY)
            ),
            None,
        )
        leaf[first or LOOP] += count
        deepest[owner] += count
        deepest_libs[owner][library] += count
        wheres = [w for _, w in frames]
        for part, needles in PARTS.items():
            if needles is None:
                # our interceptors' own work: the deepest iam_grpc frame is an interceptor
                if "interceptors/" in owner or "CheckAnswerInterceptor" in owner:
                    inclusive[part] += count
            elif any(n in w for w in wheres for n in needles):
                inclusive[part] += count

    def share(n: int) -> float:
        return round(100 * n / main_busy, 1) if main_busy else 0.0

    return {
        "seconds": seconds,
        "busy_cores_by_thread": {
            t: round(n / rate / seconds, 3) for t, n in threads.most_common() if n / rate / seconds >= 0.01
        },
        "main_thread_busy_samples": main_busy,
        "main_by_leaf_component_pct": {k: share(v) for k, v in leaf.most_common(16)},
        "main_by_deepest_iam_function_pct": {
            k: {"pct": share(v), "libraries": {lib: share(n) for lib, n in deepest_libs[k].most_common(4)}}
            for k, v in deepest.most_common(25)
        },
        "main_inclusive_parts_pct": {k: share(inclusive[k]) for k in PARTS},
    }


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is missing: .venv/bin/pip install py-spy")
    return found


def record(pid: int, seconds: float, out: Path, native: bool) -> subprocess.Popen[bytes]:
    command = [
        py_spy(),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(round(seconds)),
        "--rate",
        str(RATE),
        "--format",
        "raw",
        "--threads",
        "--full-filenames",
        "-o",
        str(out),
    ]
    if native:
        command.append("--native")
    else:
        command.append("--nonblocking")  # no pause per sample: the load runs at full speed
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def profile_h2load(target: Target, seconds: float, out: Path, native: bool) -> dict[str, Any]:
    server = target.server
    url = f"http://127.0.0.1:{server.port}{target.method}"
    body = grpc_frame(target.request)
    shape = {"headers": target.headers, "connections": 8, "streams": 16}
    h2load(url, body, seconds=2.0, **shape)  # warm-up
    before = summed(scrape(p) for p in server.metrics_ports)
    result: dict[str, Any] = {}

    def load() -> None:
        result["load"] = h2load(url, body, seconds=seconds + 3, server_pids=server.pids, **shape)

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(1.5)
    spy = record(server.process.pid, seconds, out, native)
    _, errors = spy.communicate()
    loader.join()
    after = summed(scrape(p) for p in server.metrics_ports)
    if spy.returncode != 0:
        raise RuntimeError(errors.decode())
    calls = delta(before, after, "iam_rpc_total", method=target.method)
    return {
        "rps_under_profiler": round(result["load"].requests_per_s),
        "sql_statements_per_call": round(delta(before, after, "iam_sql_statements_total") / max(calls, 1), 3),
        "denylist_fallbacks": delta(before, after, "iam_denylist_fallbacks_total"),
    }


async def profile_flow(server: Server, case: str, seconds: float, out: Path, native: bool) -> dict[str, Any]:
    if case == "login":
        accounts = await accounts_on(server, 96)
        spy = record(server.process.pid, seconds, out, native)
        row = await login_load(server, accounts, seconds + 1, 16)
    else:
        accounts = await accounts_on(server, 32)
        spy = record(server.process.pid, seconds, out, native)
        row = await refresh_load(server, accounts, seconds + 1, 32)
    _, errors = await asyncio.to_thread(spy.communicate)
    if spy.returncode != 0:
        raise RuntimeError(errors.decode())
    return {"under_profiler": row}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--cases", default="health,verify,authz,login,refresh")
    parser.add_argument("--server", choices=("prod1", "emb1"), default="prod1")
    parser.add_argument("--out", type=Path, default=Path("var/profiles"))
    parser.add_argument(
        "--python-only",
        action="store_true",
        help="no native frames, sampled without pausing the process (grpc's Cython/C work then shows"
        " as the event loop's)",
    )
    parser.add_argument("--summarise", nargs="*", type=Path, help="only summarise these raw files")
    args = parser.parse_args()
    if args.summarise:
        for path in args.summarise:
            print(json.dumps({path.stem: summarise(path, args.seconds)}, indent=2))
        return
    py_spy()
    from loguru import logger

    logger.remove()
    args.out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in args.cases.split(",") if c]
    native = not args.python_only
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        extra: dict[str, str] = {}
        if args.server == "prod1":
            url, prefix = stack.enter_context(own_database())
            extra = production_env(url, prefix)
        server = start_iam(Path(tmp) / args.server, args.server, extra)
        stack.callback(server.stop)
        targets = {t.key.split(".", 1)[1]: t for t in targets_for(server)}
        for case in cases:
            raw = args.out / f"{args.server}-{case}.txt"
            if case in targets:
                load = profile_h2load(targets[case], args.seconds, raw, native)
            else:
                load = asyncio.run(profile_flow(server, case, args.seconds, raw, native))
            summary = {"case": case, "server": args.server, **load, **summarise(raw, args.seconds)}
            (args.out / f"{args.server}-{case}.json").write_text(json.dumps(summary, indent=2))
            print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
