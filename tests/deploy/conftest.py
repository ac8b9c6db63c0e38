"""Fixtures for the deployment material tests (deploy/, Dockerfile)."""

from __future__ import annotations

from tests.e2e.conftest import fresh_mysql

__all__ = ["fresh_mysql"]
