"""The test tree's own rules: pytest imports each test file by its basename (no packages), so two
files of one name in tests/unit and tests/cluster break collection of the whole suite."""

from __future__ import annotations

from collections import Counter

from tests.conftest import REPO


def test_every_test_file_has_a_name_of_its_own() -> None:
    names = Counter(path.name for path in (REPO / "tests").glob("*/test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
