"""Tests of zenmux_emit.emit: real UDP sockets, real files and FIFOs; never raises, never waits."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from zenmux_emit import emit
from zenmux_emit.emit import FileEmitter, NullEmitter, UdpEmitter, encode_json, open_emitter, valid_id


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)  # a bound on a failing test, not a synchronisation
    yield sock
    sock.close()


def _port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def _closed_udp_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = _port(sock)
    sock.close()
    return port


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("gen-1", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("resp_0123:abc.DEF-_", True),
        ("has space", False),
        ("naïve", False),
        ("line\nbreak", False),
        (None, False),
        (12, False),
    ],
)
def test_valid_id(value: object, ok: bool) -> None:
    assert valid_id(value) is ok


def test_encode_json_keeps_scalar_labels_and_protects_the_id() -> None:
    line = encode_json(
        "gen-1",
        {"feature": "chat", "n": 3, "flag": True, "generation_id": "evil", 4: "x", "obj": [1]},  # type: ignore[dict-item]
    )
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"generation_id": "gen-1", "feature": "chat", "n": "3", "flag": "true"}
    assert json.loads(encode_json("gen-1", None, "meta.id")) == {"meta.id": "gen-1"}


def test_udp_plain_sends_one_id_per_datagram(receiver: socket.socket) -> None:
    sender = UdpEmitter("127.0.0.1", _port(receiver))
    assert sender.emit("gen-1", {"feature": "ignored in plain"})
    assert sender.emit("gen-2")
    assert receiver.recv(65535) == b"gen-1\n"
    assert receiver.recv(65535) == b"gen-2\n"
    assert (sender.sent, sender.dropped) == (2, 0)
    sender.close()


def test_udp_json_carries_labels(receiver: socket.socket) -> None:
    sender = open_emitter(f"udp://127.0.0.1:{_port(receiver)}?format=json&id_field=gid")
    assert isinstance(sender, UdpEmitter)
    assert sender.emit("gen-1", {"feature": "search"})
    assert json.loads(receiver.recv(65535)) == {"gid": "gen-1", "feature": "search"}


def test_udp_localhost_and_ipv6_loopback() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as six:
        try:
            six.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        six.settimeout(5)
        sender = open_emitter(f"udp://[::1]:{_port(six)}")
        assert sender.emit("gen-6")
        assert six.recv(100) == b"gen-6\n"
    assert UdpEmitter("localhost", 9)._address == ("127.0.0.1", 9)


def test_udp_rejects_invalid_ids_without_sending(receiver: socket.socket) -> None:
    sender = UdpEmitter("127.0.0.1", _port(receiver))
    assert not sender.emit("bad id")
    assert not sender.emit("x" * 200)
    assert not sender.emit(None)  # type: ignore[arg-type]
    assert sender.emit("good")
    assert receiver.recv(100) == b"good\n"  # the first datagram that arrived is the valid one
    assert (sender.sent, sender.dropped) == (1, 3)
    assert "invalid id" in sender.last_error


def test_udp_unreachable_target_never_raises() -> None:
    port = _closed_udp_port()
    sender = UdpEmitter("127.0.0.1", port)
    # Nobody listens: the kernel may answer with ICMP port-unreachable; later sends must still not raise.
    results = [sender.emit(f"gen-{i}") for i in range(50)]
    assert all(isinstance(r, bool) for r in results)
    # An address that cannot be used at all gives a disabled emitter, not an exception.
    for bad in (UdpEmitter("127.0.0.1", 70000), UdpEmitter("127.0.0.1", 0), UdpEmitter("127.0.0.1", 1, format="x")):
        assert bad.emit("gen-1") is False
        assert bad.last_error
    closed = UdpEmitter("127.0.0.1", port)
    closed.close()
    assert closed.emit("gen-1") is False


def test_udp_socket_is_non_blocking_and_a_flood_does_not_wait() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sink.bind(("127.0.0.1", 0))  # bound but never read: its buffer fills at once
        sender = UdpEmitter("127.0.0.1", _port(sink), format="json")
        assert sender._sock is not None and sender._sock.gettimeout() == 0.0
        sender._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for i in range(20_000):  # a blocking send would hang here; a non-blocking one drops or sends
            assert isinstance(sender.emit(f"gen-{i}", {"feature": "f" * 500}), bool)
        assert sender.sent + sender.dropped == 20_000


def test_udp_oversized_datagram_is_dropped(receiver: socket.socket) -> None:
    sender = UdpEmitter("127.0.0.1", _port(receiver), format="json")
    assert not sender.emit("gen-1", {f"k{i}": "v" * 1024 for i in range(80)})
    assert sender.last_error == "datagram too large"


def test_file_appends_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "generations.log"
    sender = open_emitter(f"file://{path}")
    assert isinstance(sender, FileEmitter)
    assert sender.emit("gen-1", {"feature": "chat"})
    assert sender.emit("gen-2")
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"generation_id": "gen-1", "feature": "chat"},
        {"generation_id": "gen-2"},
    ]
    assert (path.stat().st_mode & 0o777) == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_file_lines_stay_whole_under_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "generations.log"
    sender = FileEmitter(path)
    barrier = threading.Barrier(8)

    def write(worker: int) -> None:
        barrier.wait()
        for i in range(250):
            sender.emit(f"w{worker}-{i}", {"feature": "x" * 300})

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [json.loads(line)["generation_id"] for line in path.read_text().splitlines()]
    assert sorted(ids) == sorted(f"w{w}-{i}" for w in range(8) for i in range(250))


def test_file_rotates_past_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "generations.log"
    sender = FileEmitter(path, max_bytes=100)
    for i in range(10):
        assert sender.emit(f"gen-{i:02d}")  # 27 bytes a line
    rotated = (tmp_path / "generations.log.1").read_text().splitlines()
    current = path.read_text().splitlines()
    assert len(rotated) == 4 and json.loads(rotated[0])["generation_id"] == "gen-04"
    assert [json.loads(x)["generation_id"] for x in current] == ["gen-08", "gen-09"]


def test_file_unwritable_targets_never_raise(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for target in (tmp_path / "missing-dir" / "x.log", blocker / "x.log", tmp_path):
        sender = FileEmitter(target)
        assert sender.emit("gen-1") is False
        assert sender.dropped == 1 and sender.last_error.startswith("write failed")
    assert FileEmitter(tmp_path / "ok.log").emit("bad id!") is False


def test_file_fifo_without_reader_or_room_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    sender = FileEmitter(fifo)
    assert sender.emit("gen-1") is False  # a blocking open would wait for a reader forever
    assert sender.last_error == "FIFO has no reader"
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        results = [sender.emit(f"gen-{i}", {"pad": "p" * 1000}) for i in range(200)]  # ~200 KB > a pipe's buffer
        assert results[0] is True
        assert results[-1] is False and sender.last_error.startswith("target busy")
        first = os.read(reader, 65536).split(b"\n")[0]
        assert json.loads(first)["generation_id"] == "gen-0"
    finally:
        os.close(reader)


@pytest.mark.parametrize(
    "target",
    ["", "none", "tcp://127.0.0.1:1", "udp://127.0.0.1", "file://relative/path", "udp://[::1", "file:///x?max_bytes=z"],
)
def test_unusable_targets_give_a_null_emitter(target: str) -> None:
    sender = open_emitter(target)
    assert isinstance(sender, NullEmitter)
    assert sender.emit("gen-1") is False


def test_module_emit_uses_the_environment(monkeypatch: pytest.MonkeyPatch, receiver: socket.socket) -> None:
    monkeypatch.setattr(emit, "_default", None)
    monkeypatch.setenv(emit.ENV_VAR, f"udp://127.0.0.1:{_port(receiver)}")
    assert emit.emit("gen-env")
    assert receiver.recv(100) == b"gen-env\n"
    assert emit.default_emitter() is emit.default_emitter()


def test_module_emit_swallows_emitter_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(NullEmitter):
        def emit(self, generation_id: str, labels: object = None) -> bool:
            raise RuntimeError("boom")

    monkeypatch.setattr(emit, "_default", Broken())
    assert emit.emit("gen-1") is False


def test_zenmux_emit_imports_only_the_standard_library() -> None:
    import ast
    import sys

    for source in Path(emit.__file__).parent.glob("*.py"):
        tree = ast.parse(source.read_text())
        modules = {
            (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        assert modules - {"__future__", "zenmux_emit"} <= sys.stdlib_module_names, source.name


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "zenmux_emit" and r.levelname == "WARNING"]


@pytest.mark.parametrize(
    ("target", "said"),
    [
        ("udp://localhost", "udp target needs host:port"),
        ("udp://127.0.0.1:9467?format=jsn", "unknown format 'jsn'"),
        ("file:///nonexistent-dir-zenmux/ids.log", "directory /nonexistent-dir-zenmux does not exist"),
        ("tcp://127.0.0.1:1", "unknown target"),
    ],
)
def test_an_unusable_target_is_said_once_when_built(
    target: str, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    sender = open_emitter(target)
    assert len(_warnings(caplog)) == 1 and said in _warnings(caplog)[0]
    for _ in range(5):
        assert sender.emit("gen-1") is False
    assert len(_warnings(caplog)) == 1  # the drops that follow are within the rate limit
    assert sender.dropped == 5 and sender.last_error  # the latest reason: for a file, the failed write


def test_target_none_discards_silently(caplog: pytest.LogCaptureFixture) -> None:
    sender = open_emitter("none")
    assert sender.emit("gen-1") is False and sender.dropped == 1
    assert _warnings(caplog) == []


def test_drops_warn_on_the_first_then_once_per_interval(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    (tmp_path / "gone").mkdir()
    sender = FileEmitter(tmp_path / "gone" / "ids.log", clock=lambda: now[0])
    assert _warnings(caplog) == []  # the directory exists when the emitter is built
    (tmp_path / "gone").rmdir()
    assert sender.emit("gen-1") is False
    assert len(_warnings(caplog)) == 1 and "1 generation id(s) dropped" in _warnings(caplog)[0]
    for _ in range(9):
        now[0] += 1.0
        sender.emit("gen-2")
    assert len(_warnings(caplog)) == 1
    now[0] += emit.WARN_INTERVAL_SECONDS
    sender.emit("gen-3")
    assert len(_warnings(caplog)) == 2 and "10 generation id(s) dropped (11 in all)" in _warnings(caplog)[1]
    assert (sender.sent, sender.dropped) == (0, 11)
    (tmp_path / "gone").mkdir()
    assert sender.emit("gen-4") and sender.sent == 1


def test_the_app_side_id_pattern_is_the_exporters() -> None:
    # zenmux-emit is its own standard-library distribution, so it carries a copy of the exporter's id pattern.
    from zenmux_emit.emit import ID_PATTERN as APP_SIDE

    from exporter.ids import ID_PATTERN

    assert APP_SIDE == ID_PATTERN
