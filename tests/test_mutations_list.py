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


# ---------------------------------------------------------------------------- the mutmut survivors' list
def _exists(mutmut_name: str) -> bool:
    """Whether the function a mutmut name (`module.x_function`, `module.xǁClassǁmethod`, with or without
    `__mutmut_N`) names is in the code now."""
    import importlib

    from .mutmut_core import function_of, module_of

    module = importlib.import_module(module_of(mutmut_name))
    qualified = function_of(mutmut_name)[len(module_of(mutmut_name)) + 1:]
    if qualified.startswith("xǁ"):
        owner, _, method = qualified[2:].partition("ǁ")
        return callable(getattr(getattr(module, owner, None), method.removesuffix("*"), None)) or method == "*"
    return callable(getattr(module, qualified.removeprefix("x_"), None))


def test_every_listed_survivor_names_a_function_that_still_exists() -> None:
    """docs/testing.md accounts for each surviving mutant with a reason about its function: a function that
    was renamed or removed leaves a reason about code that is gone (`Decoder._fits`, `_rank_order` did)."""
    from .mutmut_core import documented

    gone = sorted(n for n in documented() if not _exists(n))
    assert gone == [], "docs/testing.md lists survivors of functions that no longer exist:\n" + "\n".join(gone)


def test_every_core_pattern_names_code_that_exists() -> None:
    from .mutmut_core import CORE

    gone = [p for p in CORE if not p.endswith(".*") and not _exists(p.removesuffix("__mutmut_*"))]
    assert gone == [], f"tests/mutmut_core.py CORE names functions that no longer exist: {gone}"


def test_the_report_calls_a_listed_survivor_of_a_vanished_function_stale() -> None:
    from .mutmut_core import stale

    found = {"m.x_kept__mutmut_1": "survived", "m.x_kept__mutmut_2": "killed", "m.xǁCǁrun__mutmut_1": "killed"}
    listed = {"m.x_kept__mutmut_1", "m.x_kept__mutmut_9", "m.x_gone__mutmut_3", "m.xǁCǁold__mutmut_1"}
    problems = stale(found, listed, ["m.*", "other.*"])
    assert [p.split(":")[0] for p in problems] == [
        "m.x_gone__mutmut_3", "m.xǁCǁold__mutmut_1", "m.x_kept__mutmut_9", "CORE pattern 'other.*' matches no mutant (the "
        "module or function moved"]
    assert "no longer exists" in problems[0] and "no such mutant" in problems[2]
