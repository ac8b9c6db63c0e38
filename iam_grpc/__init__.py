"""iam-grpc: a gRPC authentication service.

The public surface is small: the service (:class:`Application`), its
configuration (:class:`Settings`, :func:`load_settings`), the error tree
(:mod:`iam_grpc.errors`) and the generated protocol modules
(:mod:`iam_grpc.proto`). Everything else is internal and may change.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from iam_grpc.config import ConfigError, Settings, load_settings

try:
    __version__ = _version("iam-grpc")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"

__all__ = ["Application", "ConfigError", "Settings", "__version__", "load_settings"]


def __getattr__(name: str) -> object:
    # The application pulls in grpc and the storage drivers: import it on first use.
    if name == "Application":
        from iam_grpc.app import Application

        return Application
    raise AttributeError(name)
