"""``redis.url`` in its three forms (one server, Sentinel, Cluster): what each parses to, what is
refused and with which message, and that a refusal never quotes the password."""

from __future__ import annotations

import pytest

from iam_grpc.config import ConfigError, load_settings, mask_url
from iam_grpc.storage.ports import hash_tag, one_hash_tag
from iam_grpc.storage.redis_topology import RedisTarget, parse_redis_url


def test_one_server_urls_are_left_to_redis_py() -> None:
    """redis://, rediss:// and unix:// name one server; the URL is kept whole."""
    for url in ("redis://cache:6379/2", "rediss://:pw@cache:6380/0", "unix:///run/redis.sock?db=1"):
        assert parse_redis_url(url) == RedisTarget("single", url=url)


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_db() -> None:
    """Sentinels with and without ports (26379 by default), the master name, the database, and the
    servers' credentials (not sent to the sentinels unless asked)."""
    target = parse_redis_url("redis+sentinel://app:s%40cret@s1:26380,s2,[::1]:26381/mymaster/3")
    assert target.kind == "sentinel"
    assert target.nodes == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (target.master, target.db) == ("mymaster", 3)
    assert (target.username, target.password) == ("app", "s@cret")
    assert target.tls is False
    assert target.sentinel_auth is False
    assert parse_redis_url("redis+sentinel://s1/mymaster").db == 0
    assert parse_redis_url("redis+sentinel://:pw@s1/m/?sentinel_auth=same").sentinel_auth is True


def test_a_cluster_url_names_its_seed_nodes() -> None:
    """Seed nodes (6379 by default), credentials, TLS with its options; database 0 only."""
    target = parse_redis_url(
        "rediss+cluster://:pw@n1:7000,n2?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required&ssl_check_hostname=false"
    )
    assert target.kind == "cluster"
    assert target.nodes == (("n1", 7000), ("n2", 6379))
    assert (target.username, target.password) == (None, "pw")
    assert target.tls is True
    assert dict(target.tls_options) == {
        "ssl_ca_certs": "/ca.pem",
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": False,
    }
    assert parse_redis_url("redis+cluster://n1:7000/").nodes == (("n1", 7000),)
    assert parse_redis_url("redis+cluster://n1:7000/0").db == 0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://cache:6379", "must start with redis://"),
        ("redis+sentinels://s1/m", "must start with redis://"),
        ("redis+sentinel://s1:26379", "needs the master name"),
        ("redis+sentinel://s1:26379/", "needs the master name"),
        ("redis+sentinel://s1/m/1/2", "more than /<master>/<db>"),
        ("redis+sentinel://s1/m/x", "database that is not a number"),
        ("redis+cluster://n1:7000/1", "only database 0"),
        ("redis+cluster://n1:7000,,n2", "empty host"),
        ("redis+cluster://n1:70000", "port that is not a number from 1 to 65535"),
        ("redis+cluster://n1:x", "port that is not a number"),
        ("redis+cluster://n1:", "empty port"),
        ("redis+cluster://[::1:7000", "malformed IPv6"),
        ("redis+cluster://n1?ssl_ca_certs=/ca.pem", "unknown query parameter 'ssl_ca_certs'"),
        ("rediss+cluster://n1?ssl_cert_reqs=maybe", "ssl_cert_reqs must be"),
        ("redis+cluster://n1?sentinel_auth=same", "unknown query parameter 'sentinel_auth'"),
        ("redis+sentinel://s1/m?sentinel_auth=yes", "sentinel_auth must be same or none"),
        ("redis://cache:port/0", "is not a valid URL"),
    ],
)
def test_malformed_urls_are_refused_with_the_reason(url: str, message: str) -> None:
    """Each mistake is named; nothing is guessed."""
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_redis_url(url)


def test_a_refused_url_is_reported_without_its_password() -> None:
    """The configuration error names redis.url and the mistake, never the URL's password."""
    found = _problems({"IAM_REDIS_URL": "redis+sentinel://:hunter2-secret@s1:26379"})
    assert len(found) == 1
    assert found[0].startswith("redis.url")
    assert "master name" in found[0]
    assert "hunter2-secret" not in found[0]


def test_the_three_forms_are_accepted_by_the_configuration() -> None:
    """IAM_REDIS_URL takes every form; config show masks the password of each."""
    for url in (
        "redis://:pw-1@cache:6379/0",
        "redis+sentinel://:pw-1@s1:26379,s2:26379/iam/0",
        "rediss+cluster://user:pw-1@n1:7000,n2:7000",
    ):
        settings = load_settings(environ={"IAM_REDIS_URL": url})
        assert settings.redis.url == url
        assert "pw-1" not in settings.model_dump_json()
        assert "pw-1" not in mask_url(url)


def test_a_key_prefix_with_a_hash_tag_is_refused() -> None:
    """Braces in redis.key_prefix would put every key in one Cluster slot."""
    found = _problems({"IAM_REDIS__KEY_PREFIX": "{iam}:"})
    assert len(found) == 1
    assert found[0].startswith("redis.key_prefix")


def test_hash_tags_follow_the_cluster_rule() -> None:
    """The first non-empty {...} is the tag; without one, the whole key; one_hash_tag refuses a mix."""
    assert hash_tag("{deny}:sid:x") == "deny"
    assert hash_tag("risk:ip:{h}:42") == "h"
    assert hash_tag("a{}b{c}") == "a{}b{c}"  # an empty first tag means no tag at all
    assert hash_tag("plain") == "plain"
    one_hash_tag(["{x}:1", "{x}:2", "y{x}"])
    one_hash_tag([])
    with pytest.raises(ValueError, match="share a hash tag"):
        one_hash_tag(["{x}:1", "{y}:1"])


def _problems(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    return caught.value.problems
