"""The composition root: typed builders that make the service's object graph from settings,
opened stores and a clock (see ``docs/architecture.md`` for the graph).

- :mod:`.stores`: opening SQL (with migrations) and the ephemeral store;
- :mod:`.builders` and :mod:`.accounts`: one ``build_*`` function per component;
- :mod:`.components`: :class:`Components`, the frozen graph, and :func:`build_components`.

The service (``iam_grpc.app``), the CLI's admin use-cases (``iam_grpc.admin``) and the tests
build through these functions; nothing constructs a component anywhere else.
"""

from iam_grpc.wiring.components import Components, build_components
from iam_grpc.wiring.errors import StartupError
from iam_grpc.wiring.stores import Stores, open_database, open_stores

__all__ = ["Components", "StartupError", "Stores", "build_components", "open_database", "open_stores"]
