"""What every measurement of one benchmark run shares."""

from __future__ import annotations

from dataclasses import dataclass, field

from loader_server.data.index import DatasetIndex


@dataclass
class Bench:
    """The data set, the settings and the scratch folder of one ``loader-server bench`` run."""

    index: DatasetIndex
    data: str  # what `serve --data` gets
    scratch: str  # a private temporary folder, removed at the end
    n: int  # images timed per measurement
    rounds: int
    size: tuple[int, int]  # output (width, height)
    batch_size: int
    workers: int
    serve_extra: list[str]  # --serve-args, for every service run
    quick: bool
    read_latency_ms: float
    scaling: list[int]  # worker counts of the scaling table
    capacity: float | None = None  # the service's median images/s, known once the rounds are done
    train_models: list[str] = field(default_factory=lambda: ["resnet50"])  # torchvision models of the train probe
    train_device: str = "cuda"  # where the train probe trains
    out: str = "bench-results"  # the --out folder (probes that draw write their plots there)

    @property
    def quick_n(self) -> int:
        """Images timed by the one-off probes."""
        return max(self.batch_size * 8, self.n // 4)

    @property
    def size_text(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"

    def paths(self, n: int) -> list[str]:
        """`n` sample paths, cycling through the data set."""
        return [self.index.path(i % len(self.index)) for i in range(n)]
