"""The rules: pure async classes and functions over the ports (``iam_grpc.storage.ports``).

Nothing here imports grpc, a storage driver or another adapter; what core needs from an edge
(a User-Agent parser, counters, geo data) it takes through a Protocol the wiring satisfies.
"""
