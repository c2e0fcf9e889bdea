"""What a database outage says in the log: one line in the user's words, whichever part meets it first, no count
of pending ids the exporter cannot know, and a line when it is over."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from exporter.config import parse_config
from tests.support import FakeApi, StartExporter, fleet_data, scrape, send_udp, value, wait_until

# The operation names of the state interface (metric labels), which the log must not use as words.
INTERNAL = ("cannot due", "count failed", "due failed", "enqueue failed", "leader election failed", "forget failed")


class RefusingDatabase:
    """A TCP port that accepts each connection and closes it at once: a PostgreSQL that is not there yet (each
    connection attempt is counted, so the test can wait for the exporter's retries)."""

    def __init__(self) -> None:
        self.attempts = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RefusingDatabase:
        self.server = await asyncio.start_server(self._refuse, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"postgresql://zenmux@127.0.0.1:{self.server.sockets[0].getsockname()[1]}/zenmux"

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.attempts += 1
        writer.close()


async def test_an_outage_is_one_warning_in_plain_words_whichever_part_meets_it(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    async with RefusingDatabase() as database:
        # Every part at once: file and UDP sources, a resolver, an exposer, housekeeping.
        address = database.url.split("@")[1].split("/")[0]
        data = fleet_data(tmp_path, fake_api.url, database.url, ["ingest", "resolve", "expose"])
        exporter = await start_exporter(parse_config(data, "fleet.yaml"), api_key=data["zenmux"]["api_key"])
        send_udp(exporter.udp_sources[0].port, [fake_api.create() for _ in range(3)])

        async def every_part_failed_again() -> bool:
            text = await scrape(exporter.metrics_port)
            return database.attempts >= 3 and value(text, "zenmux_exporter_state_errors_total", operation="enqueue") > 0

        await wait_until(every_part_failed_again, timeout=30, what="several reconnects, the UDP ids' write retried")

    records = [r for r in caplog.records if r.name.startswith("exporter")]
    said = [r for r in records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in said] == ["WARNING"], [r.getMessage() for r in said]
    (line,) = [r.getMessage() for r in said]
    assert "\n" not in line
    assert f"zenmux@{address}/zenmux: cannot count the pending ids: connection failed:" in line
    text = "\n".join(r.getMessage() for r in records)
    assert not any(word in text for word in INTERNAL), text
    (started,) = [r.getMessage() for r in records if "serving /metrics" in r.getMessage()]
    assert "pending ids not counted yet" in started and "0 pending ids" not in started
