"""The README's PyTorch DDP recipe, run as written under its torchrun command: 2 ranks on CPU
(gloo) against a real server, each rank its own share, every sample once across ranks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import unique_label_list
from .record_batches import check_exactly_once
from .test_readme import BLOCKS

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
SECTION = "### PyTorch DDP: torchrun and srun"


def recipe() -> tuple[str, str]:
    """The recipe's script and its torchrun command line, from the README's section."""
    lines = (ROOT / "README.md").read_text().splitlines()
    first = lines.index(SECTION) + 1
    last = next(i for i in range(first, len(lines)) if lines[i].startswith("#")) + 1  # the next heading
    blocks = [b for b in BLOCKS if first < b.line < last]
    (script,) = [b.code for b in blocks if b.lang == "python"]
    (commands,) = [b.code for b in blocks if b.lang == "bash"]
    (torchrun,) = [line for line in commands.splitlines() if "torchrun" in line]
    return script, torchrun


@pytest.mark.timeout(300)
def test_the_torchrun_recipe_gives_each_rank_its_share_exactly_once(start_server: Any, tmp_path: Path) -> None:
    script, torchrun = recipe()
    assert "rank" not in script.split("LoaderDataset(", 1)[1].split(")", 1)[0]  # nothing about ranks for the data
    listfile = unique_label_list(tmp_path / "data", 96)  # 96 samples, batch 8: 6 batches per rank and epoch
    server = start_server(listfile, "--batch-size", "8", "--size", "32x32", "--workers", "1", transport="tcp")
    (tmp_path / "train_ddp.py").write_text(script)
    command = re.sub(r"tcp://127\.0\.0\.1:5555", server.endpoint, torchrun)
    assert command != torchrun and "--nproc-per-node 2" in command
    records = tmp_path / "records"
    env = {**os.environ, "RECORD_BATCHES_DIR": str(records), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "record_site"), str(ROOT),
                                          os.environ.get("PYTHONPATH", "")])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOADER_RANK", "LOADER_WORLD_SIZE", "SLURM_STEP_ID"):
        env.pop(name, None)
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=280)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for rank in (0, 1):
        assert f"rank {rank}/2: epoch 1 loss" in output, output[-4000:]
    summary = check_exactly_once(records, world_size=2, epochs=2, batch_size=8)
    assert summary["steps"] == 6, summary
