"""The configuration names others rely on: every contract variable of api.md is pinned to the
settings it sets, errors name the variable that feeds a setting, and docs/configuration.md
names only variables and settings that exist (the reverse, every setting documented, is
``test_config.py::test_every_setting_is_documented``)."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from iam_grpc.config import CallerSettings, CallersSettings, ConfigError, Settings, load_settings, sources
from iam_grpc.config.signin import OidcProvider

DOC = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()

# api.md, "Configuration names a deployment relies on" and "Configuration additions (second round)":
# (variable, value, the settings it sets with the value each gets). IAM_CONFIG_FILE names the TOML
# file and sets nothing itself; IAM_TEST_FAILPOINTS is not in api.md but is a flat name as well.
CONTRACT_PINS: list[tuple[str, str, dict[str, Any]]] = [
    ("IAM_MODE", "production", {"mode": "production"}),
    (
        "IAM_DATABASE_URL",
        "mysql+asyncmy://iam:pw@db:3306/iam",
        {"database.url": "mysql+asyncmy://iam:pw@db:3306/iam"},
    ),
    ("IAM_REDIS_URL", "redis://127.0.0.1:6379/0", {"redis.url": "redis://127.0.0.1:6379/0"}),
    ("IAM_DATA_DIR", "/srv/iam", {"data_dir": Path("/srv/iam")}),
    ("IAM_GRPC_LISTEN", "0.0.0.0:6000", {"server.host": "0.0.0.0", "server.port": 6000}),
    ("IAM_HTTP_LISTEN", "[::1]:9100", {"http.host": "::1", "http.port": 9100}),
    ("IAM_HTTP_LISTEN", "", {"http.enabled": False}),
    (
        "IAM_SMTP_URL",
        "smtps://mailer:p%40ss@smtp.example.com",
        {
            "mail.smtp.host": "smtp.example.com",
            "mail.smtp.port": 465,
            "mail.smtp.tls": True,
            "mail.smtp.starttls": "off",
            "mail.smtp.username": "mailer",
            "mail.smtp.password": "p@ss",
        },
    ),
    (
        "IAM_MAIL_FROM",
        "Acme Security <security@acme.test>",
        {"mail.from_name": "Acme Security", "mail.from_address": "security@acme.test"},
    ),
    ("IAM_PUBLIC_LINK_BASE", "https://app.acme.test/", {"links.base_url": "https://app.acme.test"}),
    ("IAM_HIBP_MODE", "offline", {"hibp.mode": "offline"}),
    ("IAM_HIBP_URL", "http://127.0.0.1:9999/range/", {"hibp.url": "http://127.0.0.1:9999/range/"}),
    ("IAM_MX_CHECK", "true", {"email_checks.check_mx": True}),
    (
        "IAM_DNS_NAMESERVERS",
        "127.0.0.1:5353, 10.0.0.2",
        {"email_checks.nameservers": ["127.0.0.1:5353", "10.0.0.2"]},
    ),
    ("IAM_GEOIP_CITY_DB", "/geo/city.mmdb", {"geoip.city_db": Path("/geo/city.mmdb")}),
    ("IAM_GEOIP_ASN_DB", "/geo/asn.mmdb", {"geoip.asn_db": Path("/geo/asn.mmdb")}),
    ("IAM_GEOIP_ANONYMOUS_DB", "/geo/anon.mmdb", {"geoip.anonymous_db": Path("/geo/anon.mmdb")}),
    ("IAM_LOG_DIR", "/var/log/iam", {"logging.dir": Path("/var/log/iam")}),
    ("IAM_LOG_LEVEL", "warning", {"logging.level": "WARNING"}),
    ("IAM_REFRESH_GRACE_SECONDS", "5", {"refresh.grace": timedelta(seconds=5)}),
    ("IAM_ARGON2_MEMORY_KIB", "65536", {"passwords.memory_kib": 65536}),
    ("IAM_ARGON2_TIME_COST", "3", {"passwords.time_cost": 3}),
    ("IAM_ARGON2_PARALLELISM", "4", {"passwords.parallelism": 4}),
    ("IAM_NATS_URL", "nats://127.0.0.1:4222", {"events.nats.url": "nats://127.0.0.1:4222"}),
    ("IAM_TEST_FAILPOINTS", "1", {"test_failpoints": "1"}),
    ("IAM_WEBAUTHN_RP_ID", "example.com", {"webauthn.rp_id": "example.com"}),
    (
        "IAM_WEBAUTHN_ORIGINS",
        "http://localhost:3000, http://app.localhost:8080",
        {"webauthn.origins": ["http://localhost:3000", "http://app.localhost:8080"]},
    ),
    (
        "IAM_OIDC_PROVIDERS",
        '{"acme": {"issuer": "https://id.acme.test", "client_ids": ["web"], "jwks_file": "/etc/acme.json"}}',
        {
            "oidc.providers": {
                "acme": OidcProvider(
                    issuer="https://id.acme.test", client_ids=["web"], jwks_file=Path("/etc/acme.json")
                )
            }
        },
    ),
]
# Second-round names of api.md that no setting reads yet: once one does, pin it above.
NOT_YET_SETTINGS: set[str] = set()


def setting(settings: BaseModel, path: str) -> Any:
    value: Any = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


@pytest.mark.parametrize(
    ("name", "value", "expected"), CONTRACT_PINS, ids=lambda x: x if isinstance(x, str) else ""
)
def test_each_contract_variable_sets_its_settings(name: str, value: str, expected: dict[str, Any]) -> None:
    """Set alone, a contract variable gives each of its settings the pinned value."""
    loaded = load_settings(environ={name: value})
    assert {path: setting(loaded, path) for path in expected} == expected
    # and the default when unset differs, so the check above cannot pass on defaults
    defaults = load_settings(environ={})
    assert {path: setting(defaults, path) for path in expected} != expected


def test_the_table_of_contract_names_is_the_pinned_one() -> None:
    """The sources' one table holds exactly the pinned names, each feeding exactly the pinned settings."""
    pinned: dict[str, set[str]] = {}
    for name, _, expected in CONTRACT_PINS:
        pinned.setdefault(name, set()).update(expected)
    assert {entry.name: set(entry.settings) for entry in sources.CONTRACT} == pinned
    assert sources.CONFIG_FILE_VARIABLE == "IAM_CONFIG_FILE"
    assert not NOT_YET_SETTINGS & set(sources.CONTRACT_BY_NAME)
    # derived, not copied: one contract name per setting, every setting fed by its entry
    assert len(sources.CONTRACT_NAME_OF) == sum(len(entry.settings) for entry in sources.CONTRACT)
    assert all(sources.CONTRACT_NAME_OF[path] == name for name, paths in pinned.items() for path in paths)


def test_second_round_names_without_a_setting_are_ignored_like_other_iam_variables() -> None:
    assert load_settings(environ=dict.fromkeys(NOT_YET_SETTINGS, "x")).mode == "embedded"


@pytest.mark.parametrize(
    ("environ", "toml", "expected"),
    [
        (
            {"IAM_SERVER__PORT": "99999"},
            "",
            "server.port (IAM_GRPC_LISTEN): Input should be less than or equal to 65535",
        ),
        (
            {"IAM_HTTP__ENABLED": "maybe"},
            "",
            "http.enabled (IAM_HTTP_LISTEN): Input should be a valid boolean, unable to interpret input",
        ),
        (
            {"IAM_MAIL__SMTP__PORT": "0"},
            "",
            "mail.smtp.port (IAM_SMTP_URL): Input should be greater than or equal to 1",
        ),
        (
            {"IAM_MAIL__FROM_ADDRESS": "[]"},
            "",
            "mail.from_address (IAM_MAIL_FROM): Input should be a valid string",
        ),
        (
            {},
            "[geoip]\ncity_db = 5\n",
            "geoip.city_db (IAM_GEOIP_CITY_DB): Input is not a valid path for <class 'pathlib.Path'>",
        ),
        (
            {},
            "test_failpoints = 5\n",
            "test_failpoints (IAM_TEST_FAILPOINTS): Input should be a valid string",
        ),
        # settings that no contract variable feeds are named alone
        (
            {"IAM_MAIL__SMTP__TIMEOUT": "soon"},
            "",
            "mail.smtp.timeout: must be a duration such as 30, '250ms', '15m' or '30d'",
        ),
    ],
    ids=lambda value: value.split(":")[0] if isinstance(value, str) and ":" in value else "",
)
def test_errors_name_the_contract_variable_of_every_setting_it_feeds(
    environ: dict[str, str], toml: str, expected: str, tmp_path: Path
) -> None:
    """Whichever source set it, a bad setting is named with the contract variable that feeds it
    (the copied alias table named 15 of them and missed the geoip, listener, mail and failpoint ones)."""
    config = tmp_path / "iam.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ, config_file=config)
    assert caught.value.problems == [expected]


# docs/configuration.md ---------------------------------------------------------------------


def resolves(path: str) -> bool:
    """Whether a documented dotted path names a setting or group (``<id>``, ``<group>``: any key)."""
    model: Any = Settings
    any_key = False
    for part in path.split("."):
        if any_key:  # a key of a dict-typed setting (ratelimit.groups.<group>)
            any_key = False
            continue
        if model is CallersSettings and part not in CallersSettings.model_fields:
            model = CallerSettings  # callers.<id>
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        if getattr(annotation, "__origin__", None) is dict:
            model, any_key = annotation.__args__[1], True
        else:
            model = annotation
    return True


_SETTING_TOKEN = re.compile(r"\.?[a-z_]+(?:\.(?:[a-z_0-9]+|<[a-z]+>|\*))*\Z")


def documented_settings(cell: str) -> list[str]:
    """The settings a table cell names in code spans: full paths, ``.key`` on the last full
    path's group, and root settings; other code spans (values such as `off`) are skipped."""
    found: list[str] = []
    group = ""
    for token in re.findall(r"`([^`]+)`", cell):
        if not _SETTING_TOKEN.match(token):
            continue
        if token.startswith("."):
            found.append(group + token)
        elif "." in token or token in Settings.model_fields:
            found.append(token)
            group = token.rpartition(".")[0]
    return found


def table_rows(header: str) -> list[list[str]]:
    """The cells of every row of the document's tables whose header row starts with ``header``."""
    rows: list[list[str]] = []
    current = ""
    for previous, line in zip(["", *DOC.splitlines()], DOC.splitlines(), strict=False):
        if not line.startswith("|"):
            continue
        if not previous.startswith("|"):
            current = line
        elif current.startswith(header) and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_every_setting_the_docs_list_exists() -> None:
    """The first column of every settings table names real settings."""
    rows = table_rows("| setting |")
    documented = [path for row in rows for path in documented_settings(row[0])]
    assert len(documented) > 150  # the scan finds the tables
    assert [path for path in documented if not resolves(path)] == []
    assert not resolves("tokens.acess_ttl")  # the check can fail
    assert not resolves("callers.bff.method")


def test_the_contract_table_of_the_docs_matches_the_sources() -> None:
    """Each row of "Contract variables" names the settings the variables of that row set."""
    rows = table_rows("| variable | default | setting |")
    seen: set[str] = set()
    for row in rows:
        names = re.findall(r"`(IAM_[A-Z0-9_]+)`", row[0])
        seen.update(names)
        fed = {
            path
            for name in names
            if name in sources.CONTRACT_BY_NAME
            for path in sources.CONTRACT_BY_NAME[name].settings
        }
        documented = documented_settings(row[2])
        wildcards = [path[:-1] for path in documented if path.endswith(".*")]
        exact = {path for path in documented if not path.endswith(".*")}
        assert exact <= fed, names
        assert {path for path in fed - exact if not path.startswith(tuple(wildcards))} == set(), names
    assert seen == set(sources.CONTRACT_BY_NAME) | {"IAM_CONFIG_FILE"}


def test_every_variable_the_docs_name_is_read() -> None:
    """Each IAM_* name in the document is a contract name, a nested setting or a _FILE variant."""
    names = set(re.findall(r"\bIAM_[A-Z0-9_]*[A-Z0-9]", DOC)) - {"IAM_CONFIG_FILE"}
    ignored_on_purpose = {"IAM_SERVICE_HOST"}  # the doc's example of a variable that is not a setting
    assert ignored_on_purpose <= names
    assert len(names) > 30
    unread = {
        name
        for name in names - ignored_on_purpose
        if not (sources.names_setting(Settings, name, declared=True) or sources.file_variant(Settings, name))
    }
    assert unread == set()
