"""iam-grpc: a gRPC authentication service.

The public surface is small: the service (:class:`Application`), its
configuration (:class:`Settings`, :func:`load_settings`), the error tree
(:mod:`iam_grpc.errors`) and the generated protocol modules
(:mod:`iam_grpc.proto`). Everything else is internal and may change.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from iam_grpc.app import Application
    from iam_grpc.config import ConfigError, Settings, load_settings

try:
    __version__ = _version("iam-grpc")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"

__all__ = ["Application", "ConfigError", "Settings", "__version__", "load_settings"]


def __getattr__(name: str) -> object:
    # Imported on first use: the application pulls in grpc and the storage drivers, and the
    # settings pydantic; a core module or the client library needs neither.
    if name == "Application":
        from iam_grpc.app import Application

        return Application
    if name in ("ConfigError", "Settings", "load_settings"):
        from iam_grpc import config

        return getattr(config, name)
    raise AttributeError(name)
