"""Which Redis deployment ``redis.url`` names, and the redis-py client for it.

Three forms (docs/configuration.md):

- one server: ``redis://[[user]:password@]host:port/db``, ``rediss://…`` (TLS), ``unix://…``;
- Sentinel: ``redis+sentinel://[[user]:password@]host:26379[,host:port…]/<master name>[/db]``
  (``rediss+sentinel://`` for TLS to the sentinels and the servers); the sentinels are asked for
  the master, and the credentials are the servers'. ``?sentinel_auth=same`` sends them to the
  sentinels too (sentinels that have a ``requirepass`` of their own);
- Redis Cluster: ``redis+cluster://[[user]:password@]host:port[,host:port…]`` (``rediss+cluster``
  for TLS): seed nodes, from which the client learns every node and slot.

TLS options ride in the query of the TLS forms: ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_cert_reqs`` (``none``, ``optional``, ``required``) and
``ssl_check_hostname`` (``true``/``false``).

The deny-list's generation marker is only worth something if it names the server that holds the
entries it vouches for (:mod:`iam_grpc.core.tokens.revocation_cache`): a :class:`Topology`
reports that server's ``run_id`` as :attr:`Topology.server_id` and calls its listeners when it
changes. On one server and behind Sentinel that is the server every connection reaches (a
failover changes it); on a Cluster it is the primary that serves the slot of the home hash tag
(:data:`~iam_grpc.storage.ports.DENY_TAG`), which a failover or a restart of that node changes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

__all__ = ["RedisTarget", "Topology", "connect", "parse_redis_url"]

Kind = Literal["single", "sentinel", "cluster"]

_SINGLE = ("redis://", "rediss://", "unix://")
_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_DEFAULT_PORT: dict[Kind, int] = {"single": 6379, "sentinel": 26379, "cluster": 6379}
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_CERT_REQS = ("none", "optional", "required")
MASTER_WATCH = 0.5  # seconds between asks of the sentinels whether the master moved


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``redis.url``. ``url`` is kept only for the single-server form (redis-py parses it)."""

    kind: Kind
    url: str = ""
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_options: tuple[tuple[str, Any], ...] = ()
    sentinel_auth: bool = False


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``redis.url``; ValueError says what is wrong, never quoting the URL (it may hold a
    password)."""
    if url.startswith(_SINGLE):
        try:
            _ = urlsplit(url).port
        except ValueError:
            raise ValueError("is not a valid URL (redis://[:password@]host:port/db)") from None
        return RedisTarget("single", url=url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ValueError(
            "must start with redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, "
            "redis+cluster:// or rediss+cluster://"
        )
    kind, tls = _SCHEMES[scheme]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(_node(text, _DEFAULT_PORT[kind]) for text in hostlist.split(","))
    master, db = "", 0
    parts = [unquote(p) for p in path.split("/")] if path else []
    if parts and parts[-1] == "":
        parts.pop()  # a trailing slash
    if kind == "sentinel":
        if not parts or not parts[0]:
            raise ValueError("needs the master name: redis+sentinel://host:26379[,host:port…]/<master>[/db]")
        if len(parts) > 2:
            raise ValueError("has more than /<master>/<db> in its path")
        master = parts[0]
        db = _db(parts[1]) if len(parts) == 2 else 0
    elif parts and (len(parts) > 1 or _db(parts[0]) != 0):
        raise ValueError("names a database other than 0: a Redis Cluster has only database 0")
    tls_options: list[tuple[str, Any]] = []
    sentinel_auth = False
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "sentinel_auth" and kind == "sentinel":
            if value not in ("same", "none"):
                raise ValueError("sentinel_auth must be same or none")
            sentinel_auth = value == "same"
        elif name in _TLS_OPTIONS and tls:
            tls_options.append((name, _tls_option(name, value)))
        else:
            raise ValueError(f"has an unknown query parameter {name!r} for {scheme}://")
    return RedisTarget(
        kind,
        nodes=nodes,
        master=master,
        db=db,
        username=username,
        password=password,
        tls=tls,
        tls_options=tuple(tls_options),
        sentinel_auth=sentinel_auth,
    )


def _node(text: str, default_port: int) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [IPv6]:port
        host, bracket, after = text[1:].partition("]")
        if not bracket or not host:
            raise ValueError("has a malformed IPv6 address in its host list")
        if after and not after.startswith(":"):
            raise ValueError("has a malformed host in its host list")
        port_text = after[1:]
    else:
        host, colon, port_text = text.partition(":")
        if colon and not port_text:
            raise ValueError("has a host with an empty port")
    if not host:
        raise ValueError("has an empty host in its host list (host:port[,host:port…])")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("has a port that is not a number from 1 to 65535")
    return host, int(port_text)


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError("has a database that is not a number")
    return int(text)


def _tls_option(name: str, value: str) -> Any:
    if name == "ssl_cert_reqs":
        if value not in _CERT_REQS:
            raise ValueError("ssl_cert_reqs must be none, optional or required")
        return value
    if name == "ssl_check_hostname":
        if value not in ("true", "false"):
            raise ValueError("ssl_check_hostname must be true or false")
        return value == "true"
    return value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _run_id(raw: Any) -> str | None:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.partition(":")[2].strip()
    return None


class Topology:
    """One configured Redis deployment: its client, and who holds the home slot.

    Every new connection reads the server's ``run_id`` before its first command (the handshake
    hook), so a restart or a failover of the server holding the home slot is noticed before any
    data read from it is used, and :attr:`listeners` are called with the new run_id.
    """

    kind: Kind = "single"

    def __init__(self) -> None:
        self.listeners: list[Callable[[str], None]] = []
        self._server_id = ""

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        raise NotImplementedError

    @property
    def server_id(self) -> str:
        """The run_id of the server holding the home slot ("" before the first connection)."""
        return self._server_id

    async def on_connect(self, connection: Any) -> None:
        """The connection handshake, then the server's run_id."""
        await connection.on_connect()
        try:
            await connection.send_command("INFO", "server", check_health=False)
            raw = await connection.read_response()
        except ResponseError:
            return  # INFO renamed or refused: restarts are then noticed by the data itself
        run_id = _run_id(raw)
        if run_id is not None:
            self._seen(connection, run_id)

    def _seen(self, connection: Any, run_id: str) -> None:
        previous, self._server_id = self._server_id, run_id
        if previous and previous != run_id:
            self._changed(run_id)

    def _changed(self, run_id: str) -> None:
        for listener in self.listeners:
            listener(run_id)

    async def ready(self) -> None:
        """Before each command: what the client needs first (background work, a cluster map)."""

    def write_mark(self) -> object:
        """Taken before writes that must reach the current master (see :meth:`confirm`)."""
        return None

    async def confirm(self, mark: object) -> None:
        """After such writes: raise ConnectionError unless they went to the server that is the
        master now. Only Sentinel can tell (and needs to): elsewhere a no-op."""

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()


class SingleServer(Topology):
    kind: Kind = "single"

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        super().__init__()
        self._client = aioredis.Redis.from_url(url, redis_connect_func=self.on_connect, **options)

    @property
    def client(self) -> aioredis.Redis:
        return self._client


class SentinelMaster(Topology):
    """The master a set of sentinels names. Besides reconnecting when a command meets a demoted or
    dead master, the sentinels are asked every :data:`MASTER_WATCH` seconds whether the master
    moved: after a failover the old master keeps answering (and accepting writes, which the new
    master never sees) until the sentinels reconfigure it, about ten seconds later."""

    kind: Kind = "sentinel"

    def __init__(
        self, target: RedisTarget, options: dict[str, Any], sentinel_options: dict[str, Any]
    ) -> None:
        super().__init__()
        self._service = target.master
        self._sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
        self._client: aioredis.Redis = self._sentinel.master_for(
            target.master, redis_connect_func=self.on_connect, db=target.db, **options
        )
        self._watch: asyncio.Task[None] | None = None

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def ready(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(
                self._watch_master(), name="redis-master-watch"
            )

    @property
    def _pool(self) -> SentinelConnectionPool:
        pool = self._client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        return pool

    def write_mark(self) -> object:
        return self._pool.master_address

    async def confirm(self, mark: object) -> None:
        """Every sentinel that answers must name the master the writes were sent to, and the
        pool must not have moved meanwhile: writes taken by an old master in the seconds before
        the sentinels reconfigure it are lost, and a caller that must not lose them (the
        deny-list) hears so and tries again, on the new master."""
        master = self._pool.master_address  # None before the write: its connection was the first
        if master is None or (mark is not None and master != mark):
            raise RedisConnectionError("the Redis master changed during the write")
        answers = await asyncio.gather(
            *(
                sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self._service)  # type: ignore[no-untyped-call]
                for sentinel in self._sentinel.sentinels
            ),
            return_exceptions=True,
        )
        for answer in answers:
            if isinstance(answer, BaseException) or not answer:
                continue  # a sentinel that does not answer (or does not know the name) has no say
            host, port = answer
            if (_text(host), int(port)) != master:
                raise RedisConnectionError("the sentinels name another Redis master")

    async def _watch_master(self) -> None:
        pool = self._pool
        while True:
            await asyncio.sleep(MASTER_WATCH)
            try:
                address = await self._sentinel.discover_master(self._service)
            except (RedisError, OSError):
                continue  # no sentinel answers, or none names a master yet: commands tell
            if pool.master_address is not None and address != pool.master_address:
                # idle connections to the old master are closed now, busy ones when released
                await pool.get_master_address()  # type: ignore[no-untyped-call]
                await pool.update_active_connections_for_reconnect()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await self._client.aclose()
        await self._sentinel.aclose()


class ClusterNodes(Topology):
    """A Redis Cluster. The server that matters for the deny-list is the primary serving the home
    slot: its run_id is :attr:`server_id`, and listeners hear when that node restarts or another
    node takes the slot over (a failover)."""

    kind: Kind = "cluster"

    def __init__(self, target: RedisTarget, options: dict[str, Any], home_tag: str) -> None:
        super().__init__()
        self._home_slot = key_slot(home_tag.encode())
        self._run_ids: dict[str, str] = {}
        self._client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            # a MOVED answer moves its slot only; never close every connection after five of them
            reinitialize_steps=0,
            **options,
        )
        # RedisCluster takes no connect hook; the node connections are built from these kwargs
        self._client.nodes_manager.connection_kwargs["redis_connect_func"] = self.on_connect

    @property
    def client(self) -> RedisCluster:
        return self._client

    def _home_node(self) -> str | None:
        nodes = self._client.nodes_manager.slots_cache.get(self._home_slot)
        return nodes[0].name if nodes else None

    @property
    def server_id(self) -> str:
        home = self._home_node()
        return self._run_ids.get(home, "") if home is not None else ""

    def _seen(self, connection: Any, run_id: str) -> None:
        node = f"{connection.host}:{connection.port}"
        self._run_ids[node] = run_id
        if node != self._home_node():
            return
        previous, self._server_id = self._server_id, run_id
        if previous and previous != run_id:
            self._changed(run_id)

    async def ready(self) -> None:
        # The slot map first (a no-op once known): commands sent before it go to a random node,
        # and a burst of the MOVED answers that follows makes redis-py close every connection.
        await self._client.initialize()

    async def ping(self) -> None:
        # every primary: with one down, its slots are (or soon will be) refused
        await self._client.ping(target_nodes=RedisCluster.PRIMARIES)


def connect(
    url: str,
    *,
    socket_timeout: timedelta,
    connect_timeout: timedelta,
    health_check_interval: timedelta,
    home_tag: str,
) -> Topology:
    """The client for ``url`` (no connection is opened yet)."""
    target = parse_redis_url(url)
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout.total_seconds(),
        "socket_connect_timeout": connect_timeout.total_seconds(),
        # A pooled connection idle this long is PINGed before use (and reconnected if dead).
        "health_check_interval": int(health_check_interval.total_seconds()),
        # Once, at once, and only for a dead connection: a restarted Redis leaves every pooled
        # connection dead, and the first command on each would fail without this.
        "retry": Retry(NoBackoff(), 1, (RedisConnectionError,)),
    }
    if target.kind == "single":
        return SingleServer(target.url, options)
    credentials = {"username": target.username, "password": target.password}
    tls: dict[str, Any] = {"ssl": True, **dict(target.tls_options)} if target.tls else {}
    if target.kind == "sentinel":
        sentinel_options = {
            "socket_timeout": options["socket_timeout"],
            "socket_connect_timeout": options["socket_connect_timeout"],
            "retry": Retry(NoBackoff(), 1, (RedisConnectionError,)),
            **tls,
            **(credentials if target.sentinel_auth else {}),
        }
        return SentinelMaster(target, {**options, **credentials, **tls}, sentinel_options)
    return ClusterNodes(target, {**options, **credentials, **tls}, home_tag)
