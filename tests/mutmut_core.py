"""Mutation testing of the pure core with mutmut, within a time budget, every survivor accounted for.

    python -m tests.mutmut_core                  # run, print the score and the survivors (4 to 7 min here)
    python -m tests.mutmut_core --only loader_server.options   # some modules (a partial score of those)
    python -m tests.mutmut_core --budget-s 600   # stop the run after 10 minutes (a partial score)
    python -m tests.mutmut_core --report         # the score of the last run, without running

mutmut (configured in pyproject.toml, [tool.mutmut]) copies the sources to mutants/, makes every
small change its mutators know in the functions below (an operator, a constant, a comparison,
a string, a removed argument...), and runs the pure tests that cover each changed function
(pytest_add_cli_args_test_selection). A mutant is killed when one of them fails. The score is
killed / (killed + survived) over the functions below; "no tests" mutants (code no pure test
runs) are listed apart.

Every survivor must be listed in docs/testing.md (its section "Surviving mutants") with the
reason it is equivalent or acceptable; a survivor that is not makes this command exit 1: kill
it with a test, or document it. Mutant names carry mutmut's numbering, which changes when the
code changes: update the list then (the command prints the new names).

Not collected by pytest (no ``test_`` prefix), and not part of the default test run: it reruns
tests hundreds of times. Class-level declarations (the message schemas' `spec(...)` ranges) are
not functions, so mutmut does not mutate them: tests/test_boundaries.py states every one of
those numbers, and tests/mutations.py plants bugs in them.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "testing.md"

#: The pure core, as mutmut names its functions (module.x_function, module.xǁClassǁmethod). Update with
#: `only_mutate` in pyproject.toml when a module moves.
CORE = [
    "loader_client.contract.sampling.*",
    "loader_server.data.subset.*",
    "loader_server.runtime.sessions.*",
    "loader_client.contract.schema.*",
    "loader_client.contract.messages.*",
    "loader_server.config.xǁServerConfigǁfingerprint__mutmut_*",
    "loader_server.options.*",  # group_hash (the fingerprint and the cache key), options_of, the groups' helpers
    "loader_server.pipeline.cache.x_cache_key__mutmut_*",
    "loader_server.pipeline.cache.x_record_shape__mutmut_*",
    "loader_server.pipeline.cache.xǁCacheLayoutǁ*",
    "loader_server.pipeline.decode.xǁDecoderǁreduction__mutmut_*",
    "loader_server.pipeline.decode.x_kept_size__mutmut_*",
    "loader_server.pipeline.decode.x_scale_covers__mutmut_*",
    "loader_server.pipeline.decode.x_decode_scale__mutmut_*",
    "loader_server.pipeline.decode.x_stored_box__mutmut_*",
]
STATUS = {0: "survived", 1: "killed", 3: "killed", 33: "no tests", 5: "no tests", 36: "timeout", -24: "timeout",
          24: "timeout", 152: "timeout", 255: "timeout", 37: "caught by type check"}


def results() -> dict[str, str]:
    """{mutant name: status} of the core's mutants, from mutmut's files under mutants/."""
    out: dict[str, str] = {}
    for meta in (ROOT / "mutants").rglob("*.meta"):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        for name, code in codes.items():
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in CORE):
                out[name] = "not checked" if code is None else STATUS.get(code, f"exit code {code}")
    return out


def documented() -> set[str]:
    """Mutant names listed in docs/testing.md."""
    return set(re.findall(r"`((?:loader_server|loader_client)\.[^`\s]+__mutmut_\d+)`", DOC.read_text()))


def module_of(name: str) -> str:
    """The module of a mutant name or of a CORE pattern (`loader_server.options.*` -> `loader_server.options`)."""
    return re.split(r"\.(?:x[_ǁ]|\*)", name, maxsplit=1)[0]


def function_of(mutant: str) -> str:
    """The mutated function of a mutant name (`module.x_name` or `module.xǁClassǁmethod`)."""
    return mutant.rsplit("__mutmut_", 1)[0]


def stale(found: dict[str, str], listed: set[str], patterns: list[str]) -> list[str]:
    """What docs/testing.md or CORE name that this run's results do not hold: a listed survivor whose function
    has no mutant any more (renamed, moved or removed: the reason written for it is about code that is gone),
    a listed mutant name that does not exist (the numbering moved), a CORE pattern that matches nothing."""
    functions = {function_of(n) for n in found}
    problems = [f"{n}: its function {function_of(n)} no longer exists (or is no longer mutated)"
                for n in sorted(listed) if function_of(n) not in functions]
    problems += [f"{n}: no such mutant (mutmut's numbering moved when the code changed; `mutmut show` the new "
                 "survivors)" for n in sorted(listed) if function_of(n) in functions and n not in found]
    problems += [f"CORE pattern {p!r} matches no mutant (the module or function moved: update CORE and "
                 "only_mutate)" for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in found)]
    return problems


def report(patterns: list[str] | None = None) -> int:
    """Print the score of the last run over `patterns` (CORE by default) and check the docs against it."""
    patterns = CORE if patterns is None else patterns
    found = {n: s for n, s in results().items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    if not found:
        print("no mutmut results under mutants/: run `python -m tests.mutmut_core` first")
        return 1
    counts: dict[str, int] = {}
    for status in found.values():
        counts[status] = counts.get(status, 0) + 1
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    survived = counts.get("survived", 0)
    score = killed / max(1, killed + survived)
    print(f"pure core: {len(found)} mutants, " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    print(f"score: {killed} killed of {killed + survived} tested = {100 * score:.1f}%")
    survivors = sorted(n for n, s in found.items() if s == "survived")
    unlisted = [n for n in survivors if n not in documented()]
    for name in survivors:
        print(f"  survived: {name}{'   <- not in docs/testing.md' if name in unlisted else ''}")
    untested = sorted(n for n, s in found.items() if s == "no tests")
    for name in untested:
        print(f"  no tests: {name}")
    unchecked = [n for n, s in found.items() if s == "not checked"]
    if unchecked:
        print(f"{len(unchecked)} mutants not checked (the budget ran out): the score is partial")
    # The documented names of the modules this run covered (a run of some modules says nothing of the rest).
    modules = {module_of(p) for p in patterns}
    listed = {n for n in documented() if module_of(n) in modules}
    for name in sorted(n for n in listed if found.get(n) in ("killed", "timeout")):
        print(f"  listed in docs/testing.md but killed now: {name} (remove it from the list)")
    problems = stale(found, listed, patterns)
    for problem in problems:
        print(f"  stale: {problem}")
    if unlisted:
        print(f"{len(unlisted)} survivors are not accounted for: kill each with a test, or list it in "
              "docs/testing.md with why it is equivalent (`mutmut show NAME` shows the change)")
    if problems:
        print(f"{len(problems)} entries of docs/testing.md or CORE name code that no longer exists: update them")
    return 1 if unlisted or problems else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=1800.0, help="stop mutmut after this many seconds")
    p.add_argument("--max-children", type=int, default=2, help="mutants tested at once")
    p.add_argument("--report", action="store_true", help="only print the last run's score")
    p.add_argument("--only", nargs="+", metavar="PATTERN",
                   help="mutate only the CORE patterns that contain one of these texts (e.g. loader_server.options): "
                        "a partial run, scored and checked on those functions alone")
    args = p.parse_args()
    patterns = [c for c in CORE if any(o in c for o in args.only)] if args.only else CORE
    if not patterns:
        p.error(f"no CORE pattern contains {args.only}")
    if args.report:
        return report(patterns)
    if shutil.which("mutmut") is None:
        print("mutmut is not installed: python3 -m pip install -e '.[mutation]'")
        return 2
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)  # a fresh run: no result of older code counts
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutants/ first, never the sources
    with subprocess.Popen(["mutmut", "run", "--max-children", str(args.max_children), *patterns], cwd=ROOT, env=env,
                          start_new_session=True) as run:
        try:
            run.wait(timeout=args.budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGTERM)
            run.wait()
            print(f"stopped after the budget of {args.budget_s:g} s")
    return report(patterns)


if __name__ == "__main__":
    sys.exit(main())
