"""Alembic environment. iam-grpc runs migrations itself (``iam-grpc migrate``
and embedded startup) and hands Alembic an open connection; this file never
builds an engine of its own."""

from __future__ import annotations

from alembic import context

from iam_grpc.storage.sql.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `iam-grpc migrate`, which provides the connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    compare_server_default=False,
    # MySQL names every primary key PRIMARY and warns about Alembic's name for this one.
    version_table_pk=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
