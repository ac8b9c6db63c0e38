"""What each piece of per-call work costs on a bare grpc.aio health server (issue 14).

Usage: python bench/chain_costs.py [--seconds S] [--rounds R] [--only VARIANT,...]

(variants: bench/bare_health.py; ``plain`` always runs, as the reference)

Every variant of bench/bare_health.py runs as a process of its own; each round loads them in
turn with h2load (-c 8 -m 16, 2 s warm-up run, then S seconds), and the median of the rounds is
reported with the server's CPU per call. The difference to ``plain`` in CPU µs per call is what
that piece costs per call; it is less sensitive to other load on the machine than the rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from _h2load import grpc_frame, h2load, h2load_path, load_average  # type: ignore[import-not-found]
from bare_health import VARIANTS  # type: ignore[import-not-found]
from grpc_health.v1 import health_pb2
from unary import HEALTH, start_bare  # type: ignore[import-not-found]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    h2load_path()
    asked = [v for v in args.only.split(",") if v]
    chosen = ["plain", *(v for v in asked if v != "plain")] if asked else list(VARIANTS)
    servers = [start_bare(v) for v in chosen]
    body = grpc_frame(health_pb2.HealthCheckRequest())
    rows: dict[str, list[tuple[float, float, float]]] = {v: [] for v in chosen}
    try:
        for _ in range(args.rounds):
            for server in servers:
                url = f"http://127.0.0.1:{server.port}{HEALTH}"
                h2load(url, body, seconds=2.0)
                result = h2load(url, body, seconds=args.seconds, server_pids=server.pids)
                if result.data_bytes != 7 * result.done:
                    raise RuntimeError(f"{server.name}: not every answer was OK")
                per_call = result.server_cpu / result.done * 1e6
                rows[server.name].append((result.requests_per_s, per_call, result.others_cores))
                print(
                    json.dumps(
                        {
                            "variant": server.name,
                            "rps": round(result.requests_per_s),
                            "server_us_per_call": round(per_call, 1),
                            "others_cores": round(result.others_cores, 2),
                            "load_avg": load_average(),
                        }
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for server in servers:
            server.stop()
    plain_rps = statistics.median(r[0] for r in rows["plain"])
    plain_us = statistics.median(r[1] for r in rows["plain"])
    print("| variant | calls/s | ÷ plain | server CPU µs/call | + µs/call vs plain |")
    print("|---|---|---|---|---|")
    for name, runs in rows.items():
        rps = statistics.median(r[0] for r in runs)
        us = statistics.median(r[1] for r in runs)
        print(f"| {name} | {rps:,.0f} | {rps / plain_rps:.2f} | {us:.0f} | {us - plain_us:+.0f} |")


if __name__ == "__main__":
    main()
