"""Plant known bugs one at a time and check that the suite sees each of them (a mutation check).

    python -m tests.mutations                 # every mutation, with its chosen tests
    python -m tests.mutations --list          # names only
    python -m tests.mutations resume-off-by-one lost-reissue   # some of them
    python -m tests.mutations --baseline      # first check that the chosen tests pass unmutated

For each mutation it copies the repository's tracked and untracked-but-not-ignored files to a
temporary directory, applies one text substitution there (never in the working tree), runs the
mutation's chosen tests against the copy (PYTHONPATH and the working directory point at the
copy, so servers and workers started by the tests run the mutated code too), and prints which
tests failed. A mutation passes the check when at least two tests fail (`MIN_FAILURES`).

Not collected by pytest (no ``test_`` prefix): it runs the suite many times over and takes
minutes. The substitutions are exact text: each must occur exactly once in its file, or the
script stops and says so. When the core is reshaped (the server's session logic moving into a
state machine, for instance), update `old`/`new` to the new code, keeping the bug the same, and
point `tests` at the tests that should catch it.

Each bug is aimed at where it now lives: the session state machine (`runtime/sessions.py`:
credit, order, hello validation), the supervisor (`runtime/supervisor.py`: re-issue and the
crash budget), the --max-bad count (`runtime/bad_files.py`), the CURVE allow-list
(`runtime/transport.py`), the client's rank check (`loader_client/options.py`), its order check
(`loader_client/receiver.py`) and its resume position (`loader_client/stream.py`). Where the
logic is pure, one of the chosen tests is a unit test (tests/test_runtime.py, the pure parts of
tests/test_guards.py) and another runs real processes. A full run takes about 11 minutes on
two shared cores; most of it is tests that wait out a timeout once the bug is planted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIN_FAILURES = 2
RUN_TIMEOUT_S = 600  # one mutation's tests; the slowest (credit-overrun) takes about 140 s
G = "tests/test_guards.py::"
E2E = "tests/test_end_to_end.py::"
RT = "tests/test_runtime.py::"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("duplicated-samples", "loader_server/sampling.py",
             "return mine[batch * self.batch_size : (batch + 1) * self.batch_size]",
             "return mine[batch * (self.batch_size - 1) : batch * (self.batch_size - 1) + self.batch_size]",
             ("tests/test_sampling.py::test_exactly_once_per_epoch",
              RT + "test_rank_shares_of_a_world_are_disjoint_and_cover_the_epoch",
              RT + "test_a_session_stream_covers_each_epoch_exactly_once_reshuffled",
              E2E + "test_every_sample_exactly_once_per_epoch[--drop-last-ipc]",
              G + "test_in_order_stream_waits_for_a_stuck_batch")),
    Mutation("shuffle-ignores-epoch", "loader_server/sampling.py",
             "np.random.SeedSequence([seed, epoch])", "np.random.SeedSequence([seed])",
             ("tests/test_sampling.py::test_same_seed_same_batches_other_epoch_other_order",
              RT + "test_a_session_stream_covers_each_epoch_exactly_once_reshuffled",
              E2E + "test_every_sample_exactly_once_per_epoch[--drop-last-ipc]")),
    Mutation("overlapping-ranks", "loader_server/sampling.py",
             "return order[rank:total:world_size]", "return order[0:total:world_size]",
             ("tests/test_sampling.py::test_ranks_are_disjoint_with_equal_batch_counts",
              RT + "test_rank_shares_of_a_world_are_disjoint_and_cover_the_epoch",
              E2E + "test_two_ranks_share_one_server",
              "tests/test_streams.py::test_rank_processes_get_disjoint_equal_shares[2]")),
    Mutation("credit-overrun", "loader_server/runtime/sessions.py",
             "        self.credit -= 1\n", "        self.credit -= 0\n",
             (RT + "test_credit_is_never_exceeded_and_clamped",
              E2E + "test_slow_trainer_makes_the_server_wait",
              G + "test_credit_is_capped_at_the_limit")),
    # The server's cap one above the protocol's MAX_CREDIT (both clamps: the hello's and a grant's).
    Mutation("credit-cap-off-by-one", "loader_server/runtime/sessions.py",
             "from loader_client.contract.messages import MAX_CREDIT, Hello\n",
             "from loader_client.contract.messages import Hello\n\nMAX_CREDIT = 65\n",
             (RT + "test_credit_is_never_exceeded_and_clamped",
              G + "test_credit_is_capped_at_the_limit")),
    Mutation("broken-ordering", "loader_server/runtime/sessions.py",
             "position = self.next_send if self.in_order else min(self.ready)",
             "position = min(self.ready)",
             (RT + "test_batches_leave_in_stream_order_whatever_order_they_finish",
              G + "test_in_order_stream_waits_for_a_stuck_batch",
              G + "test_worker_killed_while_holding_a_task_has_it_reissued",
              E2E + "test_every_sample_exactly_once_per_epoch[--drop-last-ipc]")),
    # state_dict() (and position) record the last batch returned instead of the next one.
    Mutation("resume-off-by-one", "loader_client/stream.py",
             "self._epoch, self._batch = item.info.epoch, item.info.batch + 1\n",
             "self._epoch, self._batch = item.info.epoch, item.info.batch\n",
             (E2E + "test_resume_from_state_is_bitwise_identical",
              "tests/test_streams.py::test_killed_trainer_resumes_bitwise_identical",
              "tests/test_reliability.py::test_server_restart_resumes_exactly_from_saved_state",
              "tests/test_client_trust.py::test_epochs_position_and_resume_against_an_honest_server")),
    Mutation("lost-reissue", "loader_server/runtime/supervisor.py",
             "            else:\n                self.queue.appendleft(tid)\n        self._spawn(wid)",
             "            else:\n                pass\n        self._spawn(wid)",
             (RT + "test_a_dead_workers_tasks_are_reissued_and_only_the_first_is_charged",
              RT + "test_the_same_batch_killing_three_workers_is_given_up",
              G + "test_worker_killed_while_holding_a_task_has_it_reissued",
              G + "test_batch_that_kills_workers_is_retried_until_the_limit",
              "tests/test_reliability.py::test_hung_worker_is_killed_reported_and_retried")),
    Mutation("retries-one-more", "loader_server/runtime/supervisor.py",
             "if task.crashes >= self.max_crashes:", "if task.crashes > self.max_crashes:",
             (RT + "test_the_same_batch_killing_three_workers_is_given_up",
              G + "test_batch_that_kills_workers_is_retried_until_the_limit",
              "tests/test_reliability.py::test_hung_worker_is_killed_reported_and_retried")),
    Mutation("retries-one-fewer", "loader_server/runtime/supervisor.py",
             "if task.crashes >= self.max_crashes:", "if task.crashes >= self.max_crashes - 1:",
             (RT + "test_the_same_batch_killing_three_workers_is_given_up",
              G + "test_batch_that_kills_workers_is_retried_until_the_limit",
              "tests/test_reliability.py::test_hung_worker_is_killed_reported_and_retried")),
    Mutation("rgb-bgr", "loader_server/pipeline/decode.py",
             "        elif _RGB_FLAG is not None:\n            self.flags = _RGB_FLAG\n",
             "        elif _RGB_FLAG is not None:\n            self.flags = cv2.IMREAD_COLOR\n",
             ("tests/test_decode.py::test_color_files_match_opencv_reference_in_rgb",
              "tests/test_decode.py::test_pure_red_is_red_in_rgb_order")),
    Mutation("swapped-width-height", "loader_server/pipeline/decode.py",
             "self.width, self.height = config.size", "self.height, self.width = config.size",
             ("tests/test_decode.py::test_batch_is_written_into_the_given_buffer",
              "tests/test_decode.py::test_letterbox_keeps_aspect_and_pads",
              E2E + "test_every_sample_exactly_once_per_epoch[--drop-last-ipc]")),
    Mutation("skip-policy", "loader_server/pipeline/batch.py",
             "j = next((slot + k) % n for k in range(1, n) if (slot + k) % n not in bad_set)", "j = slot",
             (G + "test_substitute_takes_the_next_good_sample_cyclically",
              G + "test_max_bad_tolerates_exactly_the_limit",
              "tests/test_reliability.py::test_skip_replaces_bad_samples_the_same_way_for_any_worker_count")),
    Mutation("max-bad-at-limit", "loader_server/runtime/bad_files.py",
             "if len(self.files) > self.limit and", "if len(self.files) >= self.limit and",
             (RT + "test_max_bad_tolerates_exactly_the_limit",
              G + "test_max_bad_tolerates_exactly_the_limit",
              "tests/test_reliability.py::test_skip_replaces_bad_samples_the_same_way_for_any_worker_count")),
    Mutation("max-pixels-at-limit", "loader_server/pipeline/decode.py",
             "if size[0] * size[1] > self.max_pixels:", "if size[0] * size[1] >= self.max_pixels:",
             (G + "test_max_pixels_at_the_limit_and_one_over",
              G + "test_server_max_pixels_at_the_limit_and_one_over")),
    Mutation("frame-size-check", "loader_client/contract/protocol.py",
             "if expected != buf.nbytes:", "if False:",
             ("tests/test_protocol.py::test_bad_array_descriptions_are_refused",
              "tests/test_protocol.py::test_fuzz_frame_sizes_must_match_exactly",
              "tests/test_fake_server.py::test_frame_of_the_wrong_size_is_a_protocol_error")),
    # The allow-list is re-read on every handshake: that reload is the line that decides.
    Mutation("curve-allow-list", "loader_server/runtime/transport.py",
             'self.configure_curve(domain="*", location=clients)',
             'self.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)',
             ("tests/test_scale_out.py::test_curve_admits_the_allowed_key_and_refuses_others",
              G + "test_curve_admits_only_the_listed_keys",
              G + "test_start_curve_admits_only_listed_keys_in_process")),
    Mutation("server-accepts-rank-equal-world", "loader_server/runtime/sessions.py",
             "if not 0 <= rank < world:", "if not 0 <= rank <= world:",
             (RT + "test_out_of_range_rank_is_refused_naming_both_values",
              G + "test_server_refuses_out_of_range_rank_naming_both",
              G + "test_refused_rank_opens_no_stream")),
    Mutation("client-accepts-rank-equal-world", "loader_client/options.py",
             "if not 0 <= rank < world_size:", "if not 0 <= rank <= world_size:",
             (G + "test_client_refuses_out_of_range_rank_before_connecting",
              G + "test_client_refuses_out_of_range_rank_from_a_saved_state")),
    Mutation("client-order-check-off", "loader_client/receiver.py",
             "if (message.epoch, message.batch) != (epoch, batch):", "if False:",
             # Not test_client_trust's test_repeated_skipped_or_out_of_order_batches_are_refused: with
             # the check off it never closes its client and hangs past pytest's timeout.
             ("tests/test_fake_server.py::test_lost_or_repeated_batch_is_a_protocol_error",
              "tests/test_fake_server.py::test_repeated_batch_from_one_of_several_servers_is_a_protocol_error")),
]


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def apply(dest: Path, m: Mutation) -> None:
    path = dest / m.path
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"{m.name}: the text to replace occurs {count} times in {m.path} (expected once); "
                         "update the mutation to the current code")
    path.write_text(text.replace(m.old, m.new))


def run_tests(dest: Path, basetemp: Path, tests: tuple[str, ...]) -> tuple[dict[str, str], list[str], float]:
    """({failed test id: why}, passed test ids) of `tests` run against the copy at `dest`, and the seconds.

    `basetemp` must be short: the tests bind ipc:// sockets under it, and a socket path over
    107 bytes makes every server fail to start, which would pass for a caught mutation.
    """
    report = basetemp.parent / f"{basetemp.name}.xml"
    env = {**os.environ, "PYTHONPATH": str(dest)}
    started = time.monotonic()
    failed: dict[str, str] = {}
    passed = []
    # A planted bug can hang a test past pytest's own timeout (a socket never closed): the run
    # is then killed with everything it started, and counts as one failure, not as a pass.
    with subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                           str(basetemp), f"--junitxml={report}", *tests], cwd=dest, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True) as run:
        try:
            run.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
            failed["(the pytest run)"] = f"hung: killed after {RUN_TIMEOUT_S} s"
    if not report.exists():
        return failed, passed, time.monotonic() - started
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            why = " ".join((problem.get("message") or "").split())
            failed[name] = why[:110] + ("..." if len(why) > 110 else "")
        elif case.find("skipped") is None:
            passed.append(name)
    return failed, passed, time.monotonic() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="mutations to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--baseline", action="store_true", help="first run the chosen tests on the unmutated copy")
    args = p.parse_args()
    known = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:34s} {m.path}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        p.error(f"unknown mutations {unknown}; --list shows them")
    chosen = [known[n] for n in args.names] if args.names else MUTATIONS
    weak = []
    with tempfile.TemporaryDirectory(prefix="lm-") as tmp:  # short: see run_tests
        if args.baseline:
            base = Path(tmp) / "c00"
            copy_repo(base)
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            failed, passed, secs = run_tests(base, Path(tmp) / "t00", tests)
            print(f"baseline: {len(passed)} passed, {len(failed)} failed in {secs:.0f} s", flush=True)
            for name, why in failed.items():
                print(f"    {name}: {why}", flush=True)
            if failed:
                return 1
            shutil.rmtree(base, ignore_errors=True)
        for k, m in enumerate(chosen, 1):
            dest = Path(tmp) / f"c{k:02d}"
            copy_repo(dest)
            apply(dest, m)
            failed, passed, secs = run_tests(dest, Path(tmp) / f"t{k:02d}", m.tests)
            verdict = "caught" if len(failed) >= MIN_FAILURES else "WEAK"
            if len(failed) < MIN_FAILURES:
                weak.append(m.name)
            print(f"{m.name}: {verdict}, {len(failed)} failed / {len(failed) + len(passed)} run in {secs:.0f} s",
                  flush=True)
            for name, why in failed.items():
                print(f"    {name}: {why}", flush=True)
            shutil.rmtree(dest, ignore_errors=True)
    if weak:
        print(f"caught by fewer than {MIN_FAILURES} tests: {', '.join(weak)}")
        return 1
    print(f"every mutation was caught by at least {MIN_FAILURES} tests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
