"""Configuration: the contract names of api.md, sources and precedence, validation that names settings and never values."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from iam_grpc.config import (
    CallerSettings,
    ConfigError,
    Settings,
    load_settings,
    mask_url,
    production_refusals,
)

SECRET = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldC0xMjM0NQ"  # 40 bytes of base64


def problems(environ: dict[str, str], **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ, **kwargs)  # type: ignore[arg-type]
    return caught.value.problems


def test_no_configuration_at_all_is_a_working_embedded_setup() -> None:
    """With nothing set: embedded mode, SQLite under ./var, in-process state, loopback listeners, reflection on."""
    s = load_settings(environ={})
    assert s.mode == "embedded"
    assert s.database.url == "sqlite+aiosqlite:///var/iam.db"
    assert s.redis.url == ""
    assert (s.grpc_address, s.http_address) == ("127.0.0.1:50051", "127.0.0.1:8081")
    assert s.reflection
    assert s.hibp.mode == "off"
    assert s.email_checks.check_mx is False
    assert s.auto_migrate
    assert s.log_dir == Path("var/logs")
    assert s.outbox_dir == Path("var/outbox")
    assert s.links.base_url == "http://localhost:3000"
    assert (s.mail.from_name, s.mail.from_address) == ("IAM", "no-reply@localhost")
    assert s.refresh.grace == timedelta(seconds=15)
    assert (s.passwords.memory_kib, s.passwords.time_cost, s.passwords.parallelism) == (19456, 2, 1)
    assert s.logging.level == "INFO"


def test_every_flat_contract_variable_of_api_md_works() -> None:
    """The flat IAM_* names operators rely on map to their nested settings."""
    s = load_settings(
        environ={
            "IAM_MODE": "embedded",
            "IAM_DATA_DIR": "/srv/iam",
            "IAM_DATABASE_URL": "mysql+asyncmy://iam:pw@db:3306/iam",
            "IAM_REDIS_URL": "redis://cache:6379/2",
            "IAM_GRPC_LISTEN": "0.0.0.0:6000",
            "IAM_HTTP_LISTEN": "[::1]:9100",
            "IAM_SMTP_URL": "smtps://mailer:p%40ss@smtp.example.com",
            "IAM_MAIL_FROM": "Acme Security <security@acme.test>",
            "IAM_PUBLIC_LINK_BASE": "https://app.acme.test/",
            "IAM_HIBP_MODE": "offline",
            "IAM_HIBP_URL": "http://127.0.0.1:9999/range/",
            "IAM_MX_CHECK": "true",
            "IAM_DNS_NAMESERVERS": "127.0.0.1:5353, 10.0.0.2",
            "IAM_GEOIP_CITY_DB": "/geo/city.mmdb",
            "IAM_GEOIP_ASN_DB": "/geo/asn.mmdb",
            "IAM_GEOIP_ANONYMOUS_DB": "/geo/anon.mmdb",
            "IAM_LOG_DIR": "/var/log/iam",
            "IAM_LOG_LEVEL": "debug",
            "IAM_REFRESH_GRACE_SECONDS": "5",
            "IAM_ARGON2_MEMORY_KIB": "65536",
            "IAM_ARGON2_TIME_COST": "3",
            "IAM_ARGON2_PARALLELISM": "4",
        }
    )
    assert s.data_dir == Path("/srv/iam")
    assert s.database.url == "mysql+asyncmy://iam:pw@db:3306/iam"
    assert s.redis.url == "redis://cache:6379/2"
    assert (s.server.host, s.server.port) == ("0.0.0.0", 6000)
    assert (s.http.host, s.http.port) == ("::1", 9100)
    smtp = s.mail.smtp
    assert (smtp.host, smtp.port, smtp.tls, smtp.starttls, smtp.username) == (
        "smtp.example.com",
        465,
        True,
        "off",
        "mailer",
    )
    assert smtp.password is not None
    assert smtp.password.get_secret_value() == "p@ss"
    assert (s.mail.from_name, s.mail.from_address) == ("Acme Security", "security@acme.test")
    assert s.links.base_url == "https://app.acme.test"
    assert (s.hibp.mode, s.hibp.url) == ("offline", "http://127.0.0.1:9999/range/")
    assert s.email_checks.check_mx is True
    assert s.email_checks.nameservers == ["127.0.0.1:5353", "10.0.0.2"]
    assert (s.geoip.city_db, s.geoip.asn_db, s.geoip.anonymous_db) == (
        Path("/geo/city.mmdb"),
        Path("/geo/asn.mmdb"),
        Path("/geo/anon.mmdb"),
    )
    assert s.log_dir == Path("/var/log/iam")
    assert s.logging.level == "DEBUG"
    assert s.refresh.grace == timedelta(seconds=5)
    assert (s.passwords.memory_kib, s.passwords.time_cost, s.passwords.parallelism) == (65536, 3, 4)
    assert s.outbox_dir == Path("/srv/iam/outbox")


def test_port_zero_and_an_empty_http_listen() -> None:
    """Port 0 is allowed (a free port is picked); an empty IAM_HTTP_LISTEN disables the ops listener."""
    s = load_settings(environ={"IAM_GRPC_LISTEN": "127.0.0.1:0", "IAM_HTTP_LISTEN": ""})
    assert s.server.port == 0
    assert not s.http.enabled


def test_nested_variables_override_defaults_and_durations_accept_units() -> None:
    """IAM_<GROUP>__<KEY> sets any setting; durations take seconds or 250ms/15m/30d."""
    s = load_settings(
        environ={
            "IAM_TOKENS__ACCESS_TTL": "10m",
            "IAM_REFRESH__ABSOLUTE_TTL": "30d",
            "IAM_REDIS__SOCKET_TIMEOUT": "250ms",
            "IAM_SHUTDOWN__GRACE": "7",
            "IAM_STEP_UP__ACTIONS": '["delete-account", "reauth"]',
        }
    )
    assert s.tokens.access_ttl == timedelta(minutes=10)
    assert s.refresh.absolute_ttl == timedelta(days=30)
    assert s.redis.socket_timeout == timedelta(milliseconds=250)
    assert s.shutdown.grace == timedelta(seconds=7)
    assert s.step_up.actions == ["delete-account", "reauth"]


def test_toml_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    """A TOML file sets any key; the environment overrides it; explicit overrides win over both."""
    config = tmp_path / "iam.toml"
    config.write_text('[tokens]\naccess_ttl = "5m"\nissuer = "from-file"\n[server]\nport = 7000\n')
    s = load_settings(environ={"IAM_CONFIG_FILE": str(config), "IAM_TOKENS__ISSUER": "from-env"})
    assert s.tokens.access_ttl == timedelta(minutes=5)
    assert s.tokens.issuer == "from-env"
    assert s.server.port == 7000
    s = load_settings(
        environ={"IAM_TOKENS__ISSUER": "from-env"}, config_file=config, tokens={"issuer": "from-flag"}
    )
    assert s.tokens.issuer == "from-flag"
    assert s.tokens.access_ttl == timedelta(minutes=5)  # the rest of the group still comes from the file


def test_unknown_keys_in_the_toml_file_are_errors(tmp_path: Path) -> None:
    """A typo in the file stops startup and names the key."""
    config = tmp_path / "iam.toml"
    config.write_text("[tokens]\naccess_tll = 5\n")
    assert problems({}, config_file=config) == ["tokens.access_tll: unknown setting"]


def test_a_typo_in_a_nested_variable_is_an_error() -> None:
    """IAM_TOKENS__ACESS_TTL names no setting: refused rather than silently ignored."""
    assert problems({"IAM_TOKENS__ACESS_TTL": "5"}) == [
        "IAM_TOKENS__ACESS_TTL: no such setting (tokens.acess_ttl)"
    ]


def test_unrelated_iam_variables_are_ignored() -> None:
    """Variables like IAM_SERVICE_HOST (injected by Kubernetes for a service named iam) do not break startup."""
    assert load_settings(environ={"IAM_SERVICE_HOST": "10.0.0.1", "IAM_PORT": "tcp://x"}).mode == "embedded"


def test_secret_values_are_never_echoed_in_errors() -> None:
    """A bad master key is reported by name only."""
    bad = "dG9vLXNob3J0LXNlY3JldA"
    found = problems({"IAM_SECRETS__MASTER_KEY": bad})
    assert len(found) == 1
    assert found[0].startswith("secrets.master_key:")
    assert bad not in found[0]


def test_errors_name_the_contract_variable() -> None:
    """A bad flat variable is named in the message, alongside the setting it feeds."""
    assert problems({"IAM_ARGON2_MEMORY_KIB": "1024"}) == [
        "passwords.memory_kib (IAM_ARGON2_MEMORY_KIB): Input should be greater than or equal to 19456"
    ]
    assert problems({"IAM_GRPC_LISTEN": "nonsense"}) == ["IAM_GRPC_LISTEN: must be host:port"]
    assert problems({"IAM_SMTP_URL": "http://x"}) == [
        "IAM_SMTP_URL: must be smtp://host:port or smtps://user:pass@host:465"
    ]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"IAM_MODE": "prod"}, "mode (IAM_MODE): Input should be 'embedded' or 'production'"),
        (
            {"IAM_ARGON2_TIME_COST": "1"},
            "passwords.time_cost (IAM_ARGON2_TIME_COST): Input should be greater than or equal to 2",
        ),
        ({"IAM_MFA__CODE_LENGTH": "5"}, "mfa.code_length: Input should be greater than or equal to 6"),
        ({"IAM_MFA__CODE_LENGTH": "9"}, "mfa.code_length: Input should be less than or equal to 8"),
        ({"IAM_KEYS__PUBLISH_AHEAD": "60"}, "keys.publish_ahead must be longer than keys.jwks_max_age"),
        (
            {"IAM_DATABASE_URL": "postgresql://x/y"},
            "database.url (IAM_DATABASE_URL): must start with sqlite+aiosqlite://, mysql+asyncmy:// or mysql+aiomysql://",
        ),
        (
            {"IAM_TOKENS__ACCESS_TTL": "soon"},
            "tokens.access_ttl: must be a duration such as 30, '250ms', '15m' or '30d'",
        ),
        (
            {"IAM_SERVER__TLS__KEY_FILE": "/k.pem"},
            "server.tls.cert_file and server.tls.key_file must be set together",
        ),
    ],
)
def test_invalid_values_are_refused_with_one_clear_line(environ: dict[str, str], expected: str) -> None:
    """Each rule violation is one line naming the setting and the rule."""
    assert problems(environ) == [expected]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"IAM_SERVER__WORKERS": "2"},
            "server.workers > 1 needs MySQL (IAM_DATABASE_URL) and Redis (IAM_REDIS_URL): workers share no memory",
        ),
        (
            {"IAM_SERVER__WORKERS": "2", "IAM_DATABASE_URL": "mysql+asyncmy://x@db/iam"},
            "server.workers > 1 needs MySQL (IAM_DATABASE_URL) and Redis (IAM_REDIS_URL): workers share no memory",
        ),
        (
            {
                "IAM_SERVER__WORKERS": "2",
                "IAM_DATABASE_URL": "mysql+asyncmy://x@db/iam",
                "IAM_REDIS_URL": "redis://r:6379/0",
                "IAM_GRPC_LISTEN": "127.0.0.1:0",
            },
            "server.workers > 1 needs a fixed port (IAM_GRPC_LISTEN), not 0",
        ),
    ],
)
def test_workers_are_refused_where_they_cannot_share_state(environ: dict[str, str], expected: str) -> None:
    """Several workers need shared SQL and Redis and one fixed port; otherwise one clear line."""
    assert problems(environ) == [expected]


def test_workers_with_shared_stores_are_accepted() -> None:
    environ = {
        "IAM_SERVER__WORKERS": "4",
        "IAM_DATABASE_URL": "mysql+asyncmy://x@db/iam",
        "IAM_REDIS_URL": "redis://r:6379/0",
    }
    assert load_settings(environ=environ).server.workers == 4


def test_file_variants_read_secrets_from_files(tmp_path: Path) -> None:
    """IAM_SECRETS__MASTER_KEY_FILE reads the key from a file, trailing newline dropped."""
    key_file = tmp_path / "master"
    key_file.write_text(SECRET + "\n")
    url_file = tmp_path / "db"
    url_file.write_text("mysql+asyncmy://iam:secret@db/iam\n")
    s = load_settings(
        environ={"IAM_SECRETS__MASTER_KEY_FILE": str(key_file), "IAM_DATABASE_URL_FILE": str(url_file)}
    )
    assert s.secrets.master_key is not None
    assert s.secrets.master_key.get_secret_value() == SECRET
    assert s.database.url == "mysql+asyncmy://iam:secret@db/iam"
    assert problems({"IAM_SECRETS__MASTER_KEY_FILE": str(tmp_path / "missing")}) == [
        "IAM_SECRETS__MASTER_KEY_FILE: the file cannot be read"
    ]


def test_settings_ending_in_file_are_not_file_variants(tmp_path: Path) -> None:
    """server.tls.cert_file is a setting of its own, not 'server.tls.cert read from a file'."""
    s = load_settings(environ={"IAM_SERVER__TLS__CERT_FILE": "/c.pem", "IAM_SERVER__TLS__KEY_FILE": "/k.pem"})
    assert s.server.tls.cert_file == Path("/c.pem")


def test_callers_are_configured_per_id() -> None:
    """callers.<id> entries sit next to the group's own switches."""
    digest = "ab" * 32
    s = load_settings(
        environ={
            "IAM_CALLERS__BFF__API_KEY_SHA256": json.dumps([digest.upper()]),
            "IAM_CALLERS__BFF__METHODS": '["iam.v1.AuthService/*"]',
            "IAM_CALLERS__ENVOY__CERT_SANS": '["envoy.mesh"]',
            "IAM_CALLERS__ENVOY__METHODS": '["/envoy.service.auth.v3.Authorization/Check"]',
            "IAM_CALLERS__ALLOW_UNAUTHENTICATED_LOOPBACK": "false",
        }
    )
    entries = s.callers.entries
    assert set(entries) == {"bff", "envoy"}
    assert entries["bff"].api_key_sha256 == [digest]
    assert entries["envoy"].methods == ["envoy.service.auth.v3.Authorization/Check"]
    assert s.callers.allow_unauthenticated_loopback is False
    assert problems(
        {"IAM_CALLERS__BFF__API_KEY_SHA256": '["not-a-digest"]', "IAM_CALLERS__BFF__METHODS": '["*"]'}
    ) == ["callers.bff.api_key_sha256: each entry must be a SHA-256 hex digest (64 hex characters)"]


def test_config_show_masks_secrets() -> None:
    """The JSON dump used by `config show` never contains a secret or a URL password."""
    s = load_settings(
        environ={
            "IAM_SECRETS__MASTER_KEY": SECRET,
            "IAM_DATABASE_URL": "mysql+asyncmy://iam:db-password@db/iam",
            "IAM_REDIS_URL": "redis://:redis-password@cache:6379/0",
            "IAM_SMTP_URL": "smtp://user:smtp-password@mail:587",
            "IAM_PASSWORDS__PEPPERS": '{"1": "pepper-pepper-pepper-1"}',
            "IAM_PASSWORDS__CURRENT_PEPPER": "1",
        }
    )
    dumped = s.model_dump_json()
    for secret in (SECRET, "db-password", "redis-password", "smtp-password", "pepper-pepper-pepper-1"):
        assert secret not in dumped
    shown = json.loads(dumped)
    assert shown["database"]["url"] == "mysql+asyncmy://iam:***@db/iam"
    assert shown["tokens"]["access_ttl"] == "15m"


def test_mask_url_removes_only_the_password() -> None:
    """Database URLs are logged with the password removed."""
    assert (
        mask_url("mysql+asyncmy://iam:pw@db:3306/iam?charset=utf8mb4")
        == "mysql+asyncmy://iam:***@db:3306/iam?charset=utf8mb4"
    )
    assert mask_url("sqlite+aiosqlite:///var/iam.db") == "sqlite+aiosqlite:///var/iam.db"


def test_production_mode_defaults_are_strict() -> None:
    """Production turns reflection, auto-migration and the embedded link base off and checks passwords and MX online."""
    s = load_settings(environ={"IAM_MODE": "production"})
    assert not s.reflection
    assert not s.auto_migrate
    assert s.hibp.mode == "online"
    assert s.email_checks.check_mx is True
    assert s.links.base_url is None


def production(**extra: str) -> Settings:
    environ = {
        "IAM_MODE": "production",
        "IAM_DATABASE_URL": "mysql+asyncmy://iam:pw@db/iam",
        "IAM_REDIS_URL": "redis://cache:6379/0",
        "IAM_SMTP_URL": "smtp://mail:587",
        "IAM_SECRETS__MASTER_KEY": SECRET,
        "IAM_PASSWORDS__PEPPERS": '{"1": "pepper-pepper-pepper-1"}',
        "IAM_PASSWORDS__CURRENT_PEPPER": "1",
        "IAM_PUBLIC_LINK_BASE": "https://app.example",
        "IAM_CALLERS__BFF__API_KEY_SHA256": json.dumps(["ab" * 32]),
        "IAM_CALLERS__BFF__METHODS": '["*"]',
    }
    environ.update(extra)
    return load_settings(environ={k: v for k, v in environ.items() if v != "-"})


def test_a_complete_production_setup_has_no_refusals() -> None:
    """MySQL, Redis, SMTP, secrets, link base and a caller: production starts."""
    assert production_refusals(production()) == []


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"IAM_DATABASE_URL": "sqlite+aiosqlite:///x.db"}, "database.url"),
        ({"IAM_REDIS_URL": "-"}, "redis.url"),
        ({"IAM_SMTP_URL": "-"}, "mail.smtp.host"),
        ({"IAM_SECRETS__MASTER_KEY": "-"}, "secrets.master_key"),
        ({"IAM_PASSWORDS__PEPPERS": "-", "IAM_PASSWORDS__CURRENT_PEPPER": "-"}, "passwords.peppers"),
        ({"IAM_PUBLIC_LINK_BASE": "-"}, "links.base_url"),
        ({"IAM_CALLERS__BFF__API_KEY_SHA256": "-", "IAM_CALLERS__BFF__METHODS": "-"}, "callers"),
        ({"IAM_SERVER__REFLECTION": "true"}, "server.reflection"),
        ({"IAM_TEST_FAILPOINTS": "1"}, "IAM_TEST_FAILPOINTS"),
    ],
)
def test_production_refuses_each_unsafe_setting(change: dict[str, str], setting: str) -> None:
    """Each unsafe production setup yields exactly one refusal naming the setting (S58)."""
    refusals = production_refusals(production(**change))
    assert len(refusals) == 1
    assert refusals[0].startswith(setting)


def test_explicitly_unauthenticated_production_is_allowed() -> None:
    """callers.allow_unauthenticated = true is an explicit opt-out of caller authentication."""
    s = production(
        IAM_CALLERS__BFF__API_KEY_SHA256="-",
        IAM_CALLERS__BFF__METHODS="-",
        IAM_CALLERS__ALLOW_UNAUTHENTICATED="true",
    )
    assert production_refusals(s) == []


def test_settings_are_frozen() -> None:
    """Nothing changes the settings after startup."""
    s = load_settings(environ={})
    with pytest.raises(ValueError, match="frozen"):
        s.tokens.issuer = "other"  # type: ignore[misc]


def _leaf_settings(model: type, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    leaves: list[str] = []
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        annotation = field.annotation
        path = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            leaves += _leaf_settings(annotation, path + ".")
            if name == "callers":
                leaves += _leaf_settings(CallerSettings, path + ".<id>.")
        else:
            leaves.append(path)
    return leaves


def test_every_setting_is_documented() -> None:
    """docs/configuration.md names every setting (by full path, or as `.key` on its group's row)."""
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text().splitlines()
    missing = []
    for path in _leaf_settings(Settings):
        group, _, key = path.rpartition(".")
        documented = any(
            f"`{path}`" in line or (group and f"`{group}." in line and f".{key}`" in line) for line in doc
        )
        if not documented:
            missing.append(path)
    assert missing == []


def test_peppers_can_come_from_files(tmp_path: Path) -> None:
    """IAM_PASSWORDS__PEPPERS__<id>_FILE reads one pepper from a file (every secret has a _FILE form)."""
    pepper = tmp_path / "pepper2"
    pepper.write_text("pepper-from-a-file-0002\n")
    s = load_settings(
        environ={"IAM_PASSWORDS__PEPPERS__2_FILE": str(pepper), "IAM_PASSWORDS__CURRENT_PEPPER": "2"}
    )
    assert s.passwords.peppers[2].get_secret_value() == "pepper-from-a-file-0002"


def test_a_value_and_its_file_variant_together_are_an_error(tmp_path: Path) -> None:
    """Setting both X and X_FILE is ambiguous: refused instead of one silently winning."""
    key_file = tmp_path / "master"
    key_file.write_text(SECRET)
    assert problems({"IAM_SECRETS__MASTER_KEY": SECRET, "IAM_SECRETS__MASTER_KEY_FILE": str(key_file)}) == [
        "IAM_SECRETS__MASTER_KEY_FILE: set either IAM_SECRETS__MASTER_KEY or IAM_SECRETS__MASTER_KEY_FILE, not both"
    ]


@pytest.mark.parametrize(
    "url", ["mysql+asyncmy://iam:pw@db:xx/iam", "mysql+asyncmy://iam:pw@db:3306", "mysql+asyncmy:///iam"]
)
def test_malformed_database_urls_are_refused_without_echoing_them(url: str) -> None:
    """A broken database URL is one config line, never a traceback, and never shows the password."""
    found = problems({"IAM_DATABASE_URL": url})
    assert len(found) == 1
    assert found[0].startswith("database.url (IAM_DATABASE_URL):")
    assert "pw" not in found[0]
