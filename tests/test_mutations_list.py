"""The planted bugs of tests/mutations.py still aim at the code and at tests that exist.

`python -m tests.mutations` takes minutes and is not part of the suite, so a refactor that moves
the text a planted bug replaces (or renames a test it names) went unnoticed for rounds: the
script then stopped at the first stale entry. These checks are fast and run with every suite.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from .mutations import MUTATIONS, ROOT, Mutation


def test_mutation_names_are_unique_and_each_changes_its_text() -> None:
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert [m.name for m in MUTATIONS if m.old == m.new or not m.old] == []


@pytest.mark.parametrize("m", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_each_planted_bug_replaces_text_that_occurs_exactly_once(m: Mutation) -> None:
    path = ROOT / m.path
    assert path.is_file(), f"{m.name}: {m.path} does not exist; point the mutation at where the code lives now"
    count = path.read_text().count(m.old)
    assert count == 1, (f"{m.name}: its text occurs {count} times in {m.path} (expected once); update `old`/`new` "
                        "to the current code, keeping the bug the same")


def _collected(files: list[str]) -> set[str]:
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    ids = {line.strip() for line in run.stdout.splitlines() if "::" in line}
    assert ids, f"collection found no tests:\n{run.stdout[-3000:]}{run.stderr[-2000:]}"
    return ids


def test_each_named_test_exists() -> None:
    """Every test id a mutation names is collected: a parametrised one by its id, a plain name (which
    selects all its cases) by at least one case."""
    named = {t for m in MUTATIONS for t in m.tests}
    files = sorted({t.split("::")[0] for t in named})
    missing_files = [f for f in files if not (ROOT / f).is_file()]
    assert missing_files == []
    ids = _collected(files)
    functions = {i.split("[", 1)[0] for i in ids}
    missing = sorted(f"{m.name}: {t}" for m in MUTATIONS for t in m.tests
                     if t not in ids and ("[" in t or t not in functions))
    assert missing == [], "tests named by tests/mutations.py that no longer exist:\n" + "\n".join(missing)


def test_each_planted_bug_names_at_least_as_many_tests_as_must_fail() -> None:
    from .mutations import MIN_FAILURES

    assert [m.name for m in MUTATIONS if len(set(m.tests)) < MIN_FAILURES] == []
