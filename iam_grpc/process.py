"""Running the service as one process or as pre-forked workers (behaviour.md 11.4).

One asyncio process uses one core. With ``server.workers = N > 1`` the parent
runs startup steps 1-4 once (database, migrations, first signing key), closes
every connection, then forks N workers before any gRPC object exists (grpc's
C core does not survive a fork). Each worker runs the whole service on the
same port with ``SO_REUSEPORT``; the kernel spreads *connections* (not
calls) over them. Workers share no memory: validation refuses N > 1 unless
the database is MySQL and the ephemeral store is Redis.

The parent only supervises: SIGTERM/SIGINT are passed on to every worker
(each drains as a single process would) and the parent exits 0 once all have
stopped. A worker that dies on its own is started again, at most
``_RESTARTS`` times a minute; beyond that the parent stops the rest and exits 1
so that the orchestrator sees the failure.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from iam_grpc.config import ConfigError, Settings
from iam_grpc.logging import component_logger, configure_logging

EXIT_REFUSED = 2
_RESTARTS = 5
_RESTART_WINDOW = 60.0
_PR_SET_PDEATHSIG = 1

log = component_logger("iam.process")


def setup_logging(settings: Settings, worker: int = 0) -> None:
    configure_logging(
        level=settings.logging.level,
        log_dir=settings.log_dir,
        rotation_mb=settings.logging.rotation_mb,
        retention_days=settings.logging.retention_days,
        redact_extra=settings.logging.redact_extra,
        worker=worker or None,
    )


def _refused(problems: list[str]) -> int:
    log.bind(problems=problems).critical("startup refused")
    for problem in problems:
        print(f"iam-grpc: refusing to start: {problem}", file=sys.stderr, flush=True)
    return EXIT_REFUSED


def _term_when_parent_dies(parent: int) -> None:
    """A worker whose parent died (SIGKILL, OOM) gets SIGTERM from the kernel and drains, rather
    than serving unsupervised (Linux prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_single(
    settings: Settings, *, migrate_on_start: bool | None, worker: int = 0, parent: int | None = None
) -> int:
    """Start the service in this process, serve until SIGTERM/SIGINT, drain, return the exit code."""
    from iam_grpc.app import Application, StartupError

    async def run() -> int:
        application = Application(settings, migrate_on_start=migrate_on_start, worker=worker)
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second signal: exiting now")
                sys.stdout.flush()
                os._exit(1)
            stop_requested.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if parent is not None:
            _term_when_parent_dies(parent)
        try:
            await application.start()
        except StartupError as exc:
            return _refused([str(exc)])
        except ConfigError as exc:
            return _refused(exc.problems)
        await stop_requested.wait()
        log.info("signal received; shutting down")
        await application.stop()
        return 0

    return asyncio.run(run())


def _worker_main(settings: Settings, worker: int, parent: int) -> None:
    """The body of a forked worker: a whole service of its own, without migrations.

    It leaves the parent's process group, so that Ctrl-C in a terminal (which signals the whole
    group) reaches the parent only, which passes one SIGTERM on: a worker signalled twice would
    take it as "exit now".
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setpgid(0, 0)
    setup_logging(settings, worker)
    sys.exit(run_single(settings, migrate_on_start=False, worker=worker, parent=parent))


def run_workers(settings: Settings, *, migrate_on_start: bool | None) -> int:
    """Prepare once, fork ``settings.server.workers`` workers, supervise them until a signal."""
    from iam_grpc.app import Application, StartupError

    try:
        asyncio.run(Application(settings, migrate_on_start=migrate_on_start).prepare())
    except StartupError as exc:
        return _refused([str(exc)])
    except ConfigError as exc:
        return _refused(exc.problems)

    context = multiprocessing.get_context("fork")
    workers: dict[int, BaseProcess] = {}
    restarts: deque[float] = deque()
    stopping = False

    def spawn(index: int) -> None:
        process = context.Process(
            target=_worker_main, args=(settings, index, os.getpid()), name=f"iam-grpc-w{index}"
        )
        process.start()
        workers[index] = process

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            for process in workers.values():
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, signal.SIGKILL)
            os._exit(1)
        stopping = True
        for process in workers.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for index in range(1, settings.server.workers + 1):
        spawn(index)
    log.bind(workers=settings.server.workers, pid=os.getpid()).info("workers started")

    failed = False
    while True:
        alive = {index: p for index, p in workers.items() if p.exitcode is None}
        if not alive:
            break
        wait([p.sentinel for p in alive.values()], timeout=1.0)
        for index, process in list(workers.items()):
            if process.exitcode is None or stopping:
                continue
            code = process.exitcode
            process.close()
            del workers[index]
            now = time.monotonic()
            while restarts and now - restarts[0] > _RESTART_WINDOW:
                restarts.popleft()
            if code == EXIT_REFUSED or len(restarts) >= _RESTARTS:
                log.bind(worker=index, exit_code=code).critical("worker failed; stopping every worker")
                failed = True
                on_signal(signal.SIGTERM, None)
                continue
            restarts.append(now)
            log.bind(worker=index, exit_code=code).error("worker exited; starting it again")
            spawn(index)
    codes = {index: p.exitcode for index, p in workers.items()}
    log.bind(exit_codes=codes).info("workers stopped")
    if failed:
        return 1
    return 0 if all(code == 0 for code in codes.values()) else 1
