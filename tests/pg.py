"""A throwaway PostgreSQL cluster for the tests (Debian's server binaries, run as the `postgres` user when the
tests run as root): one per session, a fresh database per test; and `open_state`, either backend by parameter."""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from exporter.pgstate import PostgresStore
from exporter.state import StateStore
from exporter.store import Store

PG_ROOT = Path("/usr/lib/postgresql")


def server_binaries() -> Path | None:
    """The newest installed server's bin directory (`ls /usr/lib/postgresql`: one directory per version)."""
    versions = sorted((p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()), key=lambda p: int(p.parent.name))
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    """A running server: its admin URL, and fresh databases on demand."""

    directory: Path
    port: int
    as_user: list[str]
    bin: Path
    _serial: itertools.count[int]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = f"test_{next(self._serial)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), *args],
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "stop")

    def cpu_seconds(self) -> float:
        """CPU time of the server's processes: the postmaster with the children it reaped, and the live ones."""
        ticks = os.sysconf("SC_CLK_TCK")
        postmaster = int((self.directory / "data" / "postmaster.pid").read_text().split()[0])
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile (then reaped into the postmaster's children times)
            pid, parent = int(entry.name), int(fields[1])
            if pid == postmaster:
                total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
            elif parent == postmaster:
                total += int(fields[11]) + int(fields[12])
        return total / ticks

    def transactions(self, database: str) -> int:
        """Transactions the server committed or rolled back in `database` (each round trip in autocommit is one)."""
        with psycopg.connect(self.url(), autocommit=True) as admin:
            row = admin.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (database,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def destroy(self) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(self.directory, ignore_errors=True)

    def start(self) -> None:
        self.pg_ctl(
            "-l", str(self.directory / "pg.log"), "-w", "-o",
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200",
            "start",
        )


def start_cluster() -> Cluster:
    """initdb and start a server in a new directory under /tmp (the bench uses it too)."""
    binaries = server_binaries()
    if binaries is None:
        raise RuntimeError(f"no PostgreSQL server under {PG_ROOT}: run `make tools` (installs Debian's postgresql)")
    directory = Path(tempfile.mkdtemp(prefix="zenmux-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(directory, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_user, str(binaries / "initdb"), "-D", str(directory / "data"), "--auth=trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    cluster = Cluster(directory, _free_port(), as_user, binaries, itertools.count(1))
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """The session's PostgreSQL server (scripts/install-tools.sh installs Debian's `postgresql`)."""
    try:
        cluster = start_cluster()
    except RuntimeError as err:
        pytest.fail(str(err))
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(postgres: Cluster) -> str:
    """A fresh, empty database on the session's server."""
    return postgres.create_database()


OpenState = Callable[..., Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgresql"])
async def open_state(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenState]:
    """Opens the state under test (again and again: the same file or database, as a process that replaces the
    previous one: that one is closed first, as one process holds a state), closing the last at the end."""
    opened: list[Store] = []
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else ""

    async def open_state(max_pending: int = 100) -> Store:
        for previous in opened:
            await previous.close()
        opened.clear()
        store: Store
        if url:
            store = await PostgresStore.open(
                url, password=None, instance="pod-a", max_pending=max_pending, lease_seconds=60
            )
        else:
            store = StateStore(tmp_path / "s.db", max_pending=max_pending)
        opened.append(store)
        return store

    yield open_state
    for store in opened:
        await store.close()
