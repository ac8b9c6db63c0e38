"""Decoding the rich error details of a failed call, re-exported from the client
distribution (:mod:`iam_grpc_client`), where clients get it without the server."""

from iam_grpc_client import ErrorDetails, error_details

__all__ = ["ErrorDetails", "error_details"]
