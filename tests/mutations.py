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
(`runtime/allow_list.py`), the sampling plan and skip mode's replacement rule
(`loader_client/contract/sampling.py`), the option groups the fingerprint and the cache key hash
(`loader_server/options.py`, `pipeline/cache.py`), the client's rank check
(`loader_client/options.py`), its order check (`loader_client/receiver.py`) and its resume
position (`loader_client/server_stream.py`). tests/test_mutations_list.py (part of the suite)
checks that every entry's text occurs exactly once and every test it names exists, so a refactor
that moves the code fails the suite at once instead of this script minutes in. Where the
logic is pure, one of the chosen tests is a unit test (tests/test_runtime.py, the pure parts of
tests/test_guards.py) and another runs real processes. A full run takes about 13 minutes on
two shared cores; most of it is tests that wait out a timeout once the bug is planted.

The entries after the first twenty are issue 22's: one or more of each kind of blindness a
second round of planted bugs found (ranks identical in one mode, a test deriving its bound from
the code's constant, a pixel setting outside the cache key or the fingerprint, a range widened at
an untested end, a threshold moved at an exact multiple, data changed under an unchanged
fingerprint, a liveness signal missing while a slow batch is built, a rounding rule swapped for
one that agrees on the old cases). docs/testing.md says what each kind of test must state, and
how the pure core is mutation-tested with mutmut (tests/mutmut_core.py).
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
H = "tests/test_hardening.py::"
LV = "tests/test_liveness.py::"
MR = "tests/test_modes_and_ranks.py::"
RG = "tests/test_resume_guard.py::"
RT2 = "tests/test_rounding_and_thresholds.py::"
SE = "tests/test_setting_effects.py::"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("duplicated-samples", "loader_client/contract/sampling.py",
             "        first = batch * self.batch_size\n", "        first = batch * (self.batch_size - 1)\n",
             ("tests/test_sampling.py::test_exactly_once_per_epoch",
              RT + "test_rank_shares_of_a_world_are_disjoint_and_cover_the_epoch",
              RT + "test_a_session_stream_covers_each_epoch_exactly_once_reshuffled",
              E2E + "test_every_sample_exactly_once_per_epoch[--drop-last-ipc]",
              G + "test_in_order_stream_waits_for_a_stuck_batch")),
    Mutation("shuffle-ignores-epoch", "loader_client/contract/sampling.py",
             "np.random.SeedSequence([seed, epoch])", "np.random.SeedSequence([seed])",
             ("tests/test_sampling.py::test_same_seed_same_batches_other_epoch_other_order",
              RT + "test_a_session_stream_covers_each_epoch_exactly_once_reshuffled",
              E2E + "test_every_sample_exactly_once_per_epoch[--drop-last-ipc]")),
    Mutation("overlapping-ranks", "loader_client/contract/sampling.py",
             "places = rank + world_size * np.arange(", "places = 0 + world_size * np.arange(",
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
             "from loader_client.contract.messages import MAX_CREDIT, MAX_MANIFEST_SAMPLES, Hello\n",
             "from loader_client.contract.messages import MAX_MANIFEST_SAMPLES, Hello\n\nMAX_CREDIT = 65\n",
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
    Mutation("resume-off-by-one", "loader_client/server_stream.py",
             "self._epoch, self._batch = item.info.epoch, item.info.batch + 1\n",
             "self._epoch, self._batch = item.info.epoch, item.info.batch\n",
             (E2E + "test_resume_from_state_is_bitwise_identical",
              "tests/test_streams.py::test_killed_trainer_resumes_bitwise_identical",
              "tests/test_reliability.py::test_server_restart_resumes_exactly_from_saved_state",
              "tests/test_client_trust.py::test_epochs_position_and_resume_against_an_honest_server")),
    Mutation("lost-reissue", "loader_server/runtime/supervisor.py",
             "            else:\n                self.queue.appendleft(tid)\n        if not worker.retiring:\n"
             "            self._spawn(wid)",
             "            else:\n                pass\n        if not worker.retiring:\n            self._spawn(wid)",
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
    # Skip mode's rule, defined once in the contract for the server that applies it and the client that
    # checks it: a bad place "replaced" by itself, so the bad sample's place is delivered as it was.
    Mutation("skip-policy", "loader_client/contract/sampling.py",
             "{slot: next((slot + k) % n for k in range(1, n) if (slot + k) % n not in bad_set) for slot in bad}",
             "{slot: slot for slot in bad}",
             ("tests/test_sampling.py::test_the_indices_of_a_batch_may_differ_from_the_plan_only_by_skip_modes_"
              "replacements",
              G + "test_substitute_takes_the_next_good_sample_cyclically",
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
    # The allow-list is re-read (and checked private) on every handshake: that line decides. Planted, any
    # key is admitted while the list is private and not empty (as zmq's CURVE_ALLOW_ANY would).
    Mutation("curve-allow-list", "loader_server/runtime/allow_list.py",
             "allowed = key in read_allow_list(clients)",
             "allowed = bool(read_allow_list(clients))",
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
    # ---- Issue 22: one or more of each kind the second round of planted bugs found the suite blind to.
    # All ranks identical in one sampling mode: random draws keyed without the rank.
    Mutation("random-mode-ranks-identical", "loader_client/contract/sampling.py",
             "np.random.SeedSequence([seed, epoch, rank, batch])", "np.random.SeedSequence([seed, epoch, batch])",
             ("tests/test_sampling.py::test_random_mode_gives_every_rank_its_own_draws[2]",
              MR + "test_two_ranks_get_the_shares_their_mode_promises[random]",
              MR + "test_two_ranks_get_the_shares_their_mode_promises[arrays random]")),
    # A bound whose old test derived its limit from the same constant: the socket queue raised tenfold.
    Mutation("send-queue-tenfold", "loader_server/runtime/transport.py",
             "SEND_QUEUE_BATCHES = 8\n", "SEND_QUEUE_BATCHES = 80\n",
             (H + "test_a_client_that_reads_nothing_is_sent_at_most_the_socket_queue_of_batches",
              H + "test_a_client_that_grants_credit_and_never_reads_stays_within_its_bound")),
    # A setting that changes the pixels but not the cache key: two interpolations share one cache file. The
    # key hashes DecodeOptions (options.py) with the interpolation normalised away; the fingerprint still
    # has it, as in the bug first found. (Moving `interpolation` out of DecodeOptions would take it from the
    # Decoder too, which is built from DecodeOptions alone: the setting would stop working, another bug.)
    Mutation("interpolation-outside-the-cache-key", "loader_server/pipeline/cache.py",
             "    decode = options_of(options, DecodeOptions)\n    return group_hash(decode, extra=",
             "    decode = options_of(options, DecodeOptions)\n"
             "    return group_hash(DecodeOptions(**{**vars(decode), \"interpolation\": \"linear\"}), extra=",
             (SE + "test_a_setting_changes_the_batch_the_resume_guard_and_the_cache_key_together[interpolation nearest]",
              SE + "test_a_setting_changes_the_batch_the_resume_guard_and_the_cache_key_together[interpolation cubic]",
              SE + "test_the_fingerprint_and_the_cache_key_follow_the_table",
              "tests/test_options.py::test_every_decode_setting_changes_the_cache_key[interpolation]")),
    # A pixel setting left out of the fingerprint: a state saved with --color bgr resumes on an rgb server.
    # Since the option groups (options.py) the fingerprint hashes the groups flagged `shapes_batches`: the
    # decode group's flag off takes --color (and every other decode setting) out of it, while the cache
    # key, which hashes DecodeOptions itself, still tells them apart.
    Mutation("color-outside-the-fingerprint", "loader_server/options.py",
             "    \"\"\"Everything that decides a decoded sample's pixels: the decode step reads these and nothing "
             "else.\"\"\"\n\n    shapes_batches: ClassVar[bool] = True\n",
             "    \"\"\"Everything that decides a decoded sample's pixels: the decode step reads these and nothing "
             "else.\"\"\"\n\n    shapes_batches: ClassVar[bool] = False\n",
             (SE + "test_a_setting_changes_the_batch_the_resume_guard_and_the_cache_key_together[color bgr]",
              SE + "test_a_setting_changes_the_batch_the_resume_guard_and_the_cache_key_together[color gray]",
              # Not test_options' parametrised fingerprint tests: their cases follow the flag, so under the bug
              # the [color] case does not exist and pytest runs nothing.
              SE + "test_the_fingerprint_and_the_cache_key_follow_the_table",
              "tests/test_options.py::test_the_groups_that_shape_batches_are_the_documented_ones")),
    # A range widened at a boundary no test sat on: any int32 world size passes the hello's schema.
    Mutation("world-size-range-widened", "loader_client/contract/messages.py",
             "world_size: int = spec(int, default=1, lo=-INT32_MAX, hi=MAX_WORLD_SIZE)",
             "world_size: int = spec(int, default=1, lo=-INT32_MAX, hi=INT32_MAX)",
             ("tests/test_boundaries.py::test_every_message_number_is_accepted_at_its_documented_ends_and_refused_one_past"
              "[Hello.world_size]",
              G + "test_world_size_limit_at_and_over")),
    # A threshold moved at an exact multiple: a JPEG exactly 2x the output is no longer decoded at 1/2.
    Mutation("reduction-threshold-at-exact-multiples", "loader_server/pipeline/decode.py",
             "return kw * m >= 8 * tw and kh * m >= 8 * th", "return kw * m > 8 * tw and kh * m > 8 * th",
             (RT2 + "test_jpegs_are_decoded_smaller_from_exactly_2_4_and_8_times_the_output[size0-stretch-source0-2]",
              RT2 + "test_jpegs_are_decoded_at_the_cheapest_scale_from_exactly_the_multiple_that_covers"
                    "[size0-stretch-source0-4]",
              RT2 + "test_jpegs_are_decoded_at_the_cheapest_scale_from_exactly_the_multiple_that_covers"
                    "[size5-stretch-source5-1]",
              "tests/test_decode_less.py::test_scale_covers_at_the_boundary")),
    # An input that changes the data without changing the fingerprint: arrays hashed on their first 64 KiB only.
    Mutation("array-fingerprint-first-window-only", "loader_server/data/arrays.py",
             "            h.update(flat[-(1 << 16):].tobytes())\n", "",
             (RG + "test_a_changed_data_set_refuses_a_saved_state_and_an_equal_one_resumes_it[arrays: x in its last 64 KiB]",
              RG + "test_a_changed_data_set_refuses_a_saved_state_and_an_equal_one_resumes_it"
                   "[ragged: values in the last 64 KiB]")),
    # A liveness signal missing while a slow batch is built: heartbeats only to sessions with nothing in work.
    Mutation("no-heartbeat-while-a-batch-is-built", "loader_server/runtime/delivery.py",
             "elif now - s.last_sent >= self.config.heartbeat_s:",
             "elif now - s.last_sent >= self.config.heartbeat_s and not client.tasks:",
             (LV + "test_a_batch_slower_than_the_client_timeout_is_slow_not_silent[shared memory]",
              LV + "test_a_batch_slower_than_the_client_timeout_is_slow_not_silent[frames]")),
    # A rounding rule replaced by one that agrees on every case the old tests used: half to even.
    Mutation("split-rounds-half-to-even", "loader_server/data/subset.py",
             "n_val = int(n * val_fraction + 0.5)", "n_val = round(n * val_fraction)",
             ("tests/test_subsets.py::test_split_is_disjoint_complete_sized_and_deterministic[10-0.25-3]",
              "tests/test_subsets.py::test_split_is_disjoint_complete_sized_and_deterministic[30-0.15-5]",
              "tests/test_boundaries.py::test_server_settings_on_each_side_of_their_documented_limits[val 0.05 of 10]")),
    # The saved state records the rank the client was created with, not its stream's: a client resumed from
    # a state (created without rank=) checkpoints rank 0, and the next resume takes rank 0's share.
    Mutation("state-records-the-constructor-rank", "loader_client/server_stream.py",
             '"seed": w.seed, "rank": w.rank,', '"seed": w.seed, "rank": self.options.rank,',
             (MR + "test_a_resumed_rank_continues_its_own_share",
              MR + "test_a_resumed_rank_checkpoints_its_rank_again")),
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
            if not failed and not passed:  # pytest ran nothing: a named test id does not exist under the bug
                verdict = "WEAK (none of its tests ran: is a named test id parametrised by the mutated code?)"
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
