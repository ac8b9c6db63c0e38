"""The rate-limit algorithm on one key's state (behaviour.md 8.1), in Python.

This is the reference: the in-process store runs it as is, and the Redis
store runs the same steps as one Lua script (``storage/redis.py``).
The contract tests hold both to the same answers.

State of one (group, key), all times in integer milliseconds from the
injected clock:

- per window ``i``: ``b`` bucket index (``now // length``), ``c`` count in the
  current bucket, ``p`` count in the previous bucket. The sliding estimate is
  ``p * (1 - elapsed / length) + c``;
- ``s`` strikes and ``se`` when the strike window ends;
- ``bu`` blocked until, ``nb`` blocks imposed within the last 24 h and ``ne``
  when that count is forgotten.

Nothing is permanent: every block ends at ``bu``, which is capped by
``block_max``; the escalation count is forgotten 24 h after the last block.
"""

from __future__ import annotations

from typing import Any

from iam_grpc.storage.records import HitResult, LimitSpec, LimitWindow

__all__ = [
    "BLOCK_MEMORY_MS",
    "STRIKE_WINDOW_MS",
    "hit",
    "leave_one",
    "peek",
    "refund",
    "reset",
    "state_ttl_ms",
]

BLOCK_MEMORY_MS = 24 * 3600 * 1000
# A refusal only by a burst window (shorter than a minute and than the group's longest window) adds
# no strike. It refuses a double click or a client honouring RetryInfo just as it would an
# attacker; striking on it blocked a user for 30 minutes for three quick retries. Sustained abuse
# fills the longer windows, whose refusals still strike; a group's only (or longest) window always
# strikes, however short an operator makes it. (The Redis script in storage/redis.py holds the same
# rule and constant.)
STRIKE_WINDOW_MS = 60_000


State = dict[str, Any]


def _window(state: State, i: int, spec: LimitWindow, now: int) -> tuple[int, int, int]:
    """Bucket, current and previous counts of window i at ``now`` (rolled forward)."""
    bucket = now // spec.length_ms
    stored = int(state.get(f"b{i}", -1))
    current = int(state.get(f"c{i}", 0))
    previous = int(state.get(f"p{i}", 0))
    if stored == bucket:
        return bucket, current, previous
    if stored == bucket - 1:
        return bucket, 0, current
    return bucket, 0, 0


def _estimate(spec: LimitWindow, bucket: int, current: float, previous: float, now: int) -> float:
    """The sliding count (for operators; decisions use the exact integer form in ``_fits``)."""
    elapsed = (now - bucket * spec.length_ms) / spec.length_ms
    return previous * (1.0 - elapsed) + current


def _fits(spec: LimitWindow, bucket: int, current: int, previous: int, now: int, cost: int) -> bool:
    """``previous * (1 - elapsed/L) + current + cost <= points``, multiplied out by L to stay exact."""
    length = spec.length_ms
    elapsed = now - bucket * length
    return previous * (length - elapsed) + (current + cost) * length <= spec.points * length


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _wait_ms(spec: LimitWindow, bucket: int, current: int, previous: int, now: int, cost: int) -> int:
    """Milliseconds until ``cost`` more points fit in this window (exact integer arithmetic)."""
    room = spec.points - cost
    length = spec.length_ms
    start = bucket * length
    if room < 0:
        return 2 * length  # the request is larger than the window
    if current > room:
        # After the next bucket starts, once the current count has decayed to ``room``.
        return start + length - now + _ceil_div(length * (current - room), current)
    if previous <= 0:
        return 0
    # previous * (1 - f) <= room - current  <=>  f >= (previous - room + current) / previous
    return max(0, start + _ceil_div(length * (previous - room + current), previous) - now)


def hit(state: State, spec: LimitSpec, now: int, cost: int = 1) -> HitResult:
    """Consume ``cost`` from every window, or refuse (adding a strike unless only burst windows
    refused, maybe blocking).

    Mutates ``state``.
    """
    rolled = [_window(state, i, w, now) for i, w in enumerate(spec.windows)]
    refusing = [
        (w, b, c, p)
        for w, (b, c, p) in zip(spec.windows, rolled, strict=True)
        if not _fits(w, b, c, p, now, cost)
    ]
    waits = [_wait_ms(w, b, c, p, now, cost) for w, b, c, p in refusing]
    blocked_until = int(state.get("bu", 0))
    if blocked_until > now:
        # Refused without consuming or striking; the retry covers the block and the windows.
        return HitResult(False, max([blocked_until - now, *waits]), True, 0, ())
    if not waits:
        for i, (bucket, current, previous) in enumerate(rolled):
            state[f"b{i}"], state[f"c{i}"], state[f"p{i}"] = bucket, current + cost, previous
        return HitResult(True, 0, False, 0, tuple(b for b, _, _ in rolled))
    retry = max(1, max(waits))
    bursts_only = all(w.length_ms < min(STRIKE_WINDOW_MS, spec.longest_ms) for w, _, _, _ in refusing)
    if spec.max_strikes <= 0 or bursts_only:
        return HitResult(False, retry, False, 0, ())
    strikes = int(state.get("s", 0)) if int(state.get("se", 0)) > now else 0
    strikes += 1
    if strikes < spec.max_strikes:
        state["s"], state["se"] = strikes, now + spec.longest_ms
        return HitResult(False, retry, False, 0, ())
    earlier = int(state.get("nb", 0)) if int(state.get("ne", 0)) > now else 0
    length = min(spec.block_ms * 2**earlier, spec.block_max_ms)
    state["bu"], state["nb"], state["ne"] = now + length, earlier + 1, now + BLOCK_MEMORY_MS
    state["s"], state["se"] = 0, 0
    return HitResult(False, max(retry, length), True, length, ())


def refund(
    state: State, spec: LimitSpec, now: int, windows: tuple[int, ...], buckets: tuple[int, ...], cost: int = 1
) -> None:
    """Give back ``cost`` to the listed windows, in the bucket it was taken from."""
    for i in windows:
        taken = buckets[i]
        stored = int(state.get(f"b{i}", -1))
        if stored == taken:
            state[f"c{i}"] = max(0, int(state.get(f"c{i}", 0)) - cost)
        elif stored == taken + 1:
            state[f"p{i}"] = max(0, int(state.get(f"p{i}", 0)) - cost)


def reset(state: State, windows: tuple[int, ...]) -> None:
    """Forget the counts of the listed windows (a success resets consecutive failures)."""
    for i in windows:
        state[f"c{i}"] = 0
        state[f"p{i}"] = 0


def leave_one(state: State, spec: LimitSpec, now: int, windows: tuple[int, ...]) -> None:
    """Set the listed windows to one point short of full, now: after a block, one more request
    passes and the next one is refused again (the login guard, behaviour.md 2.4)."""
    for i in windows:
        window = spec.windows[i]
        state[f"b{i}"], state[f"c{i}"], state[f"p{i}"] = now // window.length_ms, max(0, window.points - 1), 0


def peek(state: State, spec: LimitSpec, now: int) -> dict[str, Any]:
    """What an operator sees: estimates per window, strikes and block (no change)."""
    estimates = []
    for i, w in enumerate(spec.windows):
        bucket, current, previous = _window(state, i, w, now)
        estimates.append(round(_estimate(w, bucket, current, previous, now), 2))
    blocked_until = int(state.get("bu", 0))
    return {
        "estimates": estimates,
        "strikes": int(state.get("s", 0)) if int(state.get("se", 0)) > now else 0,
        "blocked_ms": max(0, blocked_until - now),
        "blocks_24h": int(state.get("nb", 0)) if int(state.get("ne", 0)) > now else 0,
    }


def state_ttl_ms(state: State, spec: LimitSpec, now: int) -> int:
    """How long the state must be kept: until every window, strike, block and block count lapses."""
    ends = [2 * spec.longest_ms, int(state.get("bu", 0)) - now, int(state.get("se", 0)) - now]
    if int(state.get("nb", 0)) > 0:
        ends.append(int(state.get("ne", 0)) - now)
    return max(1000, *ends)
