"""Run a training script as it is, recording every batch its loader clients return.

    python tests/record_batches.py OUT_DIR SCRIPT [ARGS...]        # under torchrun or srun, once per rank

Test machinery: `LoaderClient.next` is wrapped so that each batch a rank takes is appended to
OUT_DIR/rank-R.jsonl as ``{"rank", "world_size", "epoch", "batch", "steps", "indices"}``, then
SCRIPT runs as ``__main__`` (its own arguments in sys.argv), untouched. `check_exactly_once`
reads the files back. ``RECORD_STEP_S`` (seconds) makes each batch take at least that long,
so that a test can act in the middle of an epoch. `tests/record_site/sitecustomize.py` installs
the same recording in every process when RECORD_BATCHES_DIR is set (for commands that start the
ranks themselves, such as torchrun).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any


def install(out_dir: str | Path) -> None:
    """Wrap `LoaderClient.next` to record each batch in OUT_DIR/rank-R.jsonl (module doc)."""
    from loader_client.client import LoaderClient

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    original = LoaderClient.next
    pause = float(os.environ.get("RECORD_STEP_S", "0") or 0)

    def next_recorded(self: LoaderClient) -> Any:
        batch = original(self)
        info = self.last
        assert info is not None
        line = {"rank": self.rank, "world_size": self.world_size, "epoch": info.epoch, "batch": info.batch,
                "steps": self.steps_per_epoch, "indices": [int(i) for i in info.indices],
                "pid": os.getpid()}
        with open(out_dir / f"rank-{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if pause:
            time.sleep(pause)
        return batch

    LoaderClient.next = next_recorded  # type: ignore[method-assign]


def read_records(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(out_dir.glob("rank-*.jsonl")) for line in path.read_text().splitlines()]


def check_exactly_once(out_dir: Path, *, world_size: int, epochs: int, batch_size: int) -> dict[str, Any]:
    """Every rank got every batch of its share of every epoch once, and the ranks' shares are
    disjoint and together the epoch (less the drop-last remainder). Returns a summary."""
    records = read_records(out_dir)
    assert records, f"no batch was recorded in {out_dir}"
    assert {r["world_size"] for r in records} == {world_size}, {r["world_size"] for r in records}
    assert {r["rank"] for r in records} == set(range(world_size))
    steps = {r["steps"] for r in records}
    assert len(steps) == 1, f"ranks disagree on the batches per epoch: {steps}"
    (steps_per_epoch,) = steps
    summary: dict[str, Any] = {"steps": steps_per_epoch, "batches": len(records)}
    for epoch in range(epochs):
        mine = [r for r in records if r["epoch"] == epoch]
        for rank in range(world_size):
            batches = Counter(r["batch"] for r in mine if r["rank"] == rank)
            repeated = sorted(b for b, n in batches.items() if n > 1)
            missing = sorted(set(range(steps_per_epoch)) - set(batches))
            assert not repeated and not missing, (f"epoch {epoch} rank {rank}: batches {repeated} repeated, "
                                                  f"{missing} missing")
        indices = [i for r in mine for i in r["indices"]]
        assert len(indices) == world_size * steps_per_epoch * batch_size, (epoch, len(indices))
        counts = Counter(indices)
        twice = sorted(i for i, n in counts.items() if n > 1)
        assert not twice, f"epoch {epoch}: samples {twice[:10]} reached the trainers more than once"
    assert {r["epoch"] for r in records} == set(range(epochs)), sorted({r["epoch"] for r in records})
    return summary


def main(argv: list[str]) -> None:
    out_dir, script, *args = argv
    install(out_dir)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
