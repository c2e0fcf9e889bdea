"""zenmux-emit as an application installs it: its wheel, built here, in a clean venv that gets nothing else."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

APP = """
import sys
from zenmux_emit import emit, hooks
sender = emit.open_emitter(sys.argv[1])
assert sender.emit("gen-from-wheel", {"feature": "wheel"}), sender.last_error
hooks.event_hooks(sender)
assert not {"httpx", "httpx2"} & set(sys.modules), "the hooks must not import an HTTP client"
"""


def test_the_wheel_installs_alone_and_emits(tmp_path: Path) -> None:
    source = tmp_path / "zenmux-emit"  # a copy: setuptools leaves build/ beside the sources it builds
    shutil.copytree(ROOT / "zenmux-emit", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(source)],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("zenmux_emit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {n.split("/")[0] for n in names if not n.startswith("zenmux_emit-")} == {"zenmux_emit"}
    assert "zenmux_emit/py.typed" in names
    assert "Requires-Dist" not in metadata  # standard library only

    venv = tmp_path / "app-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = ["--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run([sys.executable, "-m", "pip", *install], check=True, timeout=120)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(10)  # a bound on a failing test, not a synchronisation
        target = f"udp://127.0.0.1:{receiver.getsockname()[1]}?format=json"
        # -I: the app venv's own site-packages only, not this checkout or its PYTHONPATH.
        subprocess.run([str(python), "-I", "-c", APP, target], check=True, timeout=60, cwd=tmp_path)
        assert receiver.recv(1000) == b'{"generation_id":"gen-from-wheel","feature":"wheel"}\n'
