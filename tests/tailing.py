"""A file source polled by hand on real files, with its own state and registry, and what logrotate does to
its log (copytruncate, compress): shared by the file source's and the rotation tests."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from exporter.clock import ManualClock
from exporter.config import FileSourceConfig
from exporter.ids import LinesParser, lines_parser_for
from exporter.ingest import Ingest
from exporter.sources import file as file_source
from exporter.sources.file import FileSource
from exporter.state import StateStore
from exporter.telemetry import SelfMetrics
from tests.support import json_line


class Tail:
    """A FileSource with its own state database and registry, polled by hand."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        max_pending: int = 1000,
        parse: Callable[[LinesParser], LinesParser] = lambda parse: parse,
        **config: Any,
    ) -> None:
        self.log = tmp_path / "app.log"
        self.registry = CollectorRegistry()
        self.state = StateStore(tmp_path / "state.db", max_pending=max_pending)
        self.config = FileSourceConfig(**{"name": "app", "path": str(self.log), "start_at": "beginning", **config})
        metrics = SelfMetrics(self.registry)
        self.clock = ManualClock()
        self.ingest = Ingest(self.state, metrics, self.clock, billing_delay_seconds=0)
        self.source = FileSource(
            self.config, parse(lines_parser_for(self.config)), self.ingest, self.state, metrics, clock=self.clock
        )

    @classmethod
    async def open(
        cls,
        tmp_path: Path,
        *,
        max_pending: int = 1000,
        parse: Callable[[LinesParser], LinesParser] = lambda parse: parse,
        **config: Any,
    ) -> Tail:
        tail = cls(tmp_path, max_pending=max_pending, parse=parse, **config)
        await tail.source.open_initial()
        return tail

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"source": "app", **labels}) or 0.0

    async def drain(self) -> None:
        """Polls until nothing is left: a few polls more than a rotated file needs to settle."""
        quiet = 0
        while quiet <= file_source.ROTATION_GRACE_POLLS:
            quiet = 0 if await self.source.poll() else quiet + 1


def lines(prefix: str, count: int) -> list[str]:
    return [json_line(f"{prefix}{i}") for i in range(count)]


COMPRESSORS: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def compress(path: Path, suffix: str = ".gz") -> Path:
    """What logrotate's `compress` does: gzip (or bzip2, xz) writes `path.gz`, then removes `path`."""
    target = path.with_name(path.name + suffix)
    with path.open("rb") as plain, COMPRESSORS[suffix](target, "wb") as packed:
        shutil.copyfileobj(plain, packed)
    path.unlink()
    return target


def copytruncate(log: Path, copy: Path) -> None:
    shutil.copyfile(log, copy)
    with log.open("r+b") as handle:
        handle.truncate(0)


async def reopen(tail: Tail, tmp_path: Path, **config: Any) -> Tail:
    """A new process on the same state (the old one is simply gone, as after kill -9)."""
    await tail.state.close()
    return await Tail.open(tmp_path, **config)


class Logrotate:
    """logrotate on one log: numbered rotated files (app.log.1 the newest), each way, with its compressions."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.count = 0

    def rotate(self, how: str, compression: str) -> None:
        files = sorted(self.log.parent.glob("app.log.*"), key=lambda p: -int(p.name.split(".")[2]))
        for path in files:  # app.log.N[.gz] -> app.log.N+1[.gz], oldest first
            number = int(path.name.split(".")[2])
            path.rename(path.with_name(path.name.replace(f".{number}", f".{number + 1}", 1)))
        target = self.log.with_name("app.log.1")
        if how == "rename":
            self.log.rename(target)
            self.log.touch()
        else:
            copytruncate(self.log, target)
        if compression == "compress":
            compress(target)
        elif compression == "delaycompress" and self.log.with_name("app.log.2").exists():
            compress(self.log.with_name("app.log.2"))
        self.count += 1
