"""Interceptors of the grpc.aio server, outermost first in ``iam_grpc.server.interceptor_chain``;
each has one job."""
