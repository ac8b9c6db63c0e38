"""Servicers: decode the request, call one core function, encode the reply.

Errors are raised as :mod:`iam_grpc.errors` and answered by the error-mapping
interceptor; every RPC of ``iam.v1`` is served.
"""
