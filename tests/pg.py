"""A throwaway PostgreSQL cluster for the tests (Debian's server binaries, run as the `postgres` user when the
tests run as root): one per session, a fresh database per test."""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

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

    def start(self) -> None:
        self.pg_ctl(
            "-l", str(self.directory / "pg.log"), "-w", "-o",
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200",
            "start",
        )


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """The session's PostgreSQL server (scripts/install-tools.sh installs Debian's `postgresql`)."""
    binaries = server_binaries()
    if binaries is None:
        pytest.fail(f"no PostgreSQL server under {PG_ROOT}: run `make tools` (installs Debian's postgresql)")
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
    try:
        yield cluster
    finally:
        subprocess.run(
            [*as_user, str(binaries / "pg_ctl"), "-D", str(directory / "data"), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pg_url(postgres: Cluster) -> str:
    """A fresh, empty database on the session's server."""
    return postgres.create_database()
