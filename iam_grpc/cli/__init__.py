"""The ``iam-grpc`` command (typer). Exit codes: 0 fine, 1 failure, 2 refused configuration or
startup (or a malformed operator request).

Commands only parse arguments and print: the service is run by ``iam_grpc.process``, and the
operator commands call the use-cases of ``iam_grpc.admin``.
"""

from __future__ import annotations

from iam_grpc.cli import events, operators, service
from iam_grpc.cli._app import app

__all__ = ["app", "main"]

_COMMANDS = (events, operators, service)  # imported for the commands they register on ``app``


def main() -> None:
    app()


if __name__ == "__main__":
    main()
