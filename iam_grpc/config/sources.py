"""Where the settings come from, highest precedence first:

1. explicit overrides (CLI flags, keyword arguments of ``load_settings``);
2. environment variables: ``IAM_<GROUP>__<KEY>`` (nested with ``__``), the flat
   contract names of ``api.md`` (``IAM_GRPC_LISTEN``, ``IAM_DATABASE_URL``, ...; the
   nested name wins when both are set), and ``<NAME>_FILE`` variants that read a value
   (a secret) from a file;
3. the TOML file named by ``--config`` or ``IAM_CONFIG_FILE``;
4. the defaults of the settings groups.

This is the only module of the package that reads ``os.environ``. :data:`CONTRACT` is the
one table of contract names; every other mapping between names and settings is computed
from it. Nothing here echoes a value in an error.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from iam_grpc.config.server import CallerSettings, CallersSettings
from iam_grpc.config.values import split_host_port

ENV_PREFIX = "IAM_"
CONFIG_FILE_VARIABLE = "IAM_CONFIG_FILE"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per failing setting."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------
# the contract names of api.md


# A parser turns a contract variable's text into values keyed by the last part of the settings
# its table row names ("host", "port"); a ValueError's message must not hold the value.
Parser = Callable[[str], dict[str, Any]]


@dataclass(frozen=True)
class ContractName:
    """A flat environment variable of the contract and the settings it feeds (dotted paths).

    Without a parser the text is the value of the one setting; with one, the parser's keys name
    the settings by their last part.
    """

    name: str
    settings: tuple[str, ...]
    parse: Parser | None = None

    def values(self, text: str) -> Iterator[tuple[tuple[str, ...], Any]]:
        if self.parse is None:
            yield tuple(self.settings[0].split(".")), text
            return
        by_key = {setting.rpartition(".")[2]: setting for setting in self.settings}
        for key, value in self.parse(text).items():
            yield tuple(by_key[key].split(".")), value


def _listen(text: str) -> dict[str, Any]:
    host, port = split_host_port(text)
    return {"host": host, "port": port}


def _listen_or_off(text: str) -> dict[str, Any]:
    return {"enabled": False} if not text.strip() else _listen(text)


def _seconds(text: str) -> dict[str, Any]:
    return {"grace": int(text) if text.strip().isdigit() else text}


def _failpoints(text: str) -> dict[str, Any]:
    return {"test_failpoints": "" if text.strip() in ("", "0", "false", "False") else text.strip()}


def _nameservers(text: str) -> dict[str, Any]:
    return {"nameservers": [part for part in re.split(r"[,\s]+", text) if part]}


def _mail_from(text: str) -> dict[str, Any]:
    display, address = parseaddr(text)
    if not address or "@" not in address:
        raise ValueError("must be an address such as 'IAM <no-reply@example.com>'")
    return {"from_address": address} | ({"from_name": display} if display else {})


_SMTP_FORM = "must be smtp://host:port or smtps://user:pass@host:465"


def _smtp_url(text: str) -> dict[str, Any]:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(_SMTP_FORM) from None
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError(_SMTP_FORM)
    implicit = parts.scheme == "smtps"
    # smtp:// upgrades with STARTTLS when the server offers it; ?starttls=required|off changes that
    query = dict(part.partition("=")[::2] for part in (parts.query or "").split("&") if part)
    starttls = query.get("starttls", "when_offered")
    if starttls not in ("required", "when_offered", "off"):
        raise ValueError("?starttls= must be required, when_offered or off")
    values: dict[str, Any] = {
        "host": parts.hostname,
        "port": port or (465 if implicit else 587),
        "tls": implicit,
        "starttls": "off" if implicit else starttls,
    }
    if parts.username:
        values["username"] = unquote(parts.username)
    if parts.password:
        values["password"] = unquote(parts.password)
    return values


def _origins(text: str) -> dict[str, Any]:
    return {"origins": [part.strip() for part in text.split(",") if part.strip()]}


def _providers(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError(
            "must be a JSON object: name -> {issuer, client_ids, jwks_url | jwks_file}"
        ) from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object: name -> {issuer, client_ids, jwks_url | jwks_file}")
    return {"providers": value}


_SMTP_SETTINGS = ("host", "port", "tls", "starttls", "username", "password")

CONTRACT: tuple[ContractName, ...] = (
    ContractName("IAM_MODE", ("mode",)),
    ContractName("IAM_DATA_DIR", ("data_dir",)),
    ContractName("IAM_DATABASE_URL", ("database.url",)),
    ContractName("IAM_REDIS_URL", ("redis.url",)),
    ContractName("IAM_GRPC_LISTEN", ("server.host", "server.port"), _listen),
    ContractName("IAM_HTTP_LISTEN", ("http.host", "http.port", "http.enabled"), _listen_or_off),
    ContractName("IAM_SMTP_URL", tuple(f"mail.smtp.{key}" for key in _SMTP_SETTINGS), _smtp_url),
    ContractName("IAM_MAIL_FROM", ("mail.from_address", "mail.from_name"), _mail_from),
    ContractName("IAM_PUBLIC_LINK_BASE", ("links.base_url",)),
    ContractName("IAM_HIBP_MODE", ("hibp.mode",)),
    ContractName("IAM_HIBP_URL", ("hibp.url",)),
    ContractName("IAM_MX_CHECK", ("email_checks.check_mx",)),
    ContractName("IAM_DNS_NAMESERVERS", ("email_checks.nameservers",), _nameservers),
    ContractName("IAM_GEOIP_CITY_DB", ("geoip.city_db",)),
    ContractName("IAM_GEOIP_ASN_DB", ("geoip.asn_db",)),
    ContractName("IAM_GEOIP_ANONYMOUS_DB", ("geoip.anonymous_db",)),
    ContractName("IAM_LOG_DIR", ("logging.dir",)),
    ContractName("IAM_LOG_LEVEL", ("logging.level",)),
    ContractName("IAM_REFRESH_GRACE_SECONDS", ("refresh.grace",), _seconds),
    ContractName("IAM_ARGON2_MEMORY_KIB", ("passwords.memory_kib",)),
    ContractName("IAM_ARGON2_TIME_COST", ("passwords.time_cost",)),
    ContractName("IAM_ARGON2_PARALLELISM", ("passwords.parallelism",)),
    ContractName("IAM_WEBAUTHN_RP_ID", ("webauthn.rp_id",)),
    ContractName("IAM_WEBAUTHN_ORIGINS", ("webauthn.origins",), _origins),
    ContractName("IAM_OIDC_PROVIDERS", ("oidc.providers",), _providers),
    ContractName("IAM_NATS_URL", ("events.nats.url",)),
    # not in api.md: the test suite's fault hooks, which production refuses
    ContractName("IAM_TEST_FAILPOINTS", ("test_failpoints",), _failpoints),
)

CONTRACT_BY_NAME: dict[str, ContractName] = {entry.name: entry for entry in CONTRACT}
# the contract variable that feeds a setting, named next to it in errors
CONTRACT_NAME_OF: dict[str, str] = {setting: entry.name for entry in CONTRACT for setting in entry.settings}


def label(setting: str) -> str:
    """``setting (IAM_CONTRACT_NAME)`` when a contract variable feeds it, else the setting."""
    name = CONTRACT_NAME_OF.get(setting)
    return f"{setting} ({name})" if name else setting


# ---------------------------------------------------------------------------
# names in the environment


def known_path(model: type[BaseModel], path: tuple[str, ...], *, declared: bool = False) -> bool:
    """Whether a nested env path names a real setting.

    Dict-typed groups (``passwords.peppers``, ``ratelimit.groups``, caller ids) accept any key;
    with ``declared`` the last part must be a declared field, not such a free key.
    """
    current: Any = model
    for index, part in enumerate(path):
        last = index == len(path) - 1
        if current is CallersSettings:
            if part in CallersSettings.model_fields:
                return last
            if last:
                return not declared  # callers.<id>
            return index == len(path) - 2 and path[-1] in CallerSettings.model_fields
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return current is dict and not (declared and last)
        field = current.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        origin = getattr(annotation, "__origin__", None)
        current = dict if origin is dict else annotation
    return True


def _nested_path(name: str) -> tuple[str, ...]:
    return tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))


def names_setting(root: type[BaseModel], name: str, *, declared: bool = False) -> bool:
    """Whether an environment name is a setting itself (so ``X_FILE`` may mean "X, read from a file")."""
    if "__" in name:
        return known_path(root, _nested_path(name), declared=declared)
    return name in CONTRACT_BY_NAME


def file_variant(root: type[BaseModel], name: str) -> str | None:
    """The setting an ``..._FILE`` variable reads from a file, or None when it is a setting of its own
    (``IAM_SERVER__TLS__CERT_FILE``)."""
    if not name.endswith("_FILE"):
        return None
    stem = name[: -len("_FILE")]
    if names_setting(root, name, declared=True) or not names_setting(root, stem):
        return None
    return stem


# ---------------------------------------------------------------------------
# the sources


def _set(target: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = target
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_env_value(text: str) -> Any:
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return text
    return text


class _IamEnvSource(PydanticBaseSettingsSource):
    """``IAM_*`` environment variables: nested names, contract names and ``_FILE`` variants."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ builds the whole tree

    def __call__(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        nested: dict[str, Any] = {}
        problems: list[str] = []
        for raw_name, raw_value in sorted(self._environ.items()):
            if not raw_name.startswith(ENV_PREFIX) or raw_name == CONFIG_FILE_VARIABLE:
                continue
            name, value = raw_name, raw_value
            stem = file_variant(self.settings_cls, name)
            if stem is not None:
                if stem in self._environ:
                    problems.append(f"{raw_name}: set either {stem} or {raw_name}, not both")
                    continue
                name = stem
                try:
                    value = Path(raw_value).read_text().rstrip("\r\n")
                except OSError:
                    problems.append(f"{raw_name}: the file cannot be read")
                    continue
            if "__" in name:
                path = _nested_path(name)
                if not known_path(self.settings_cls, path):
                    if path[0] in self.settings_cls.model_fields:
                        problems.append(f"{raw_name}: no such setting ({'.'.join(path)})")
                    continue
                _set(nested, path, _parse_env_value(value))
                continue
            entry = CONTRACT_BY_NAME.get(name)
            if entry is None:
                continue  # IAM_SERVICE_HOST and the like, injected by Kubernetes
            try:
                for path, parsed in entry.values(value):
                    _set(flat, path, parsed)
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
        if problems:
            raise ConfigError(problems)
        return _deep_merge(flat, nested)


class _TomlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls)
        self._path = path

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        try:
            with self._path.open("rb") as handle:
                data = tomllib.load(handle)
        except OSError:
            raise ConfigError([f"config file {self._path}: cannot be read"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config file {self._path}: not valid TOML ({exc})"]) from None
        return data


@dataclass(frozen=True)
class _LoadInputs:
    environ: Mapping[str, str]
    config_file: Path | None


_LOAD_INPUTS: ContextVar[_LoadInputs | None] = ContextVar("iam_config_inputs", default=None)


@contextmanager
def reading(environ: Mapping[str, str] | None, config_file: Path | None) -> Iterator[None]:
    """Within the block, settings are built from ``environ`` (default: the process environment)
    and ``config_file`` (default: the one ``IAM_CONFIG_FILE`` names)."""
    inputs = _LoadInputs(dict(os.environ if environ is None else environ), config_file)  # noqa: TID251
    token = _LOAD_INPUTS.set(inputs)
    try:
        yield
    finally:
        _LOAD_INPUTS.reset(token)


def settings_sources(
    settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource
) -> tuple[PydanticBaseSettingsSource, ...]:
    """The sources of one build in their precedence: overrides, environment, TOML file."""
    inputs = _LOAD_INPUTS.get()
    environ = inputs.environ if inputs is not None else dict(os.environ)  # noqa: TID251
    config_file = inputs.config_file if inputs is not None else None
    if config_file is None and environ.get(CONFIG_FILE_VARIABLE):
        config_file = Path(environ[CONFIG_FILE_VARIABLE])
    sources: list[PydanticBaseSettingsSource] = [init_settings, _IamEnvSource(settings_cls, environ)]
    if config_file is not None:
        sources.append(_TomlSource(settings_cls, config_file))
    return tuple(sources)


# ---------------------------------------------------------------------------
# errors


def _describe(error: Mapping[str, Any]) -> str:
    loc = ".".join(str(part) for part in error.get("loc", ()) if not str(part).startswith("function-"))
    message = str(error.get("msg", "invalid"))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error.get("type") == "extra_forbidden":
        message = "unknown setting"
    first = message.split(" ", 1)[0]
    if "." in first and (not loc or first.startswith(loc)):
        return message  # a cross-field rule that names its settings itself
    return f"{label(loc) if loc else 'settings'}: {message}"


def config_error(exc: ValidationError) -> ConfigError:
    """One line per failing setting, naming the contract variable that feeds it; never a value."""
    return ConfigError(
        sorted({_describe(error) for error in exc.errors(include_input=False, include_url=False)})
    )
