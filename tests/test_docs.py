"""The user-facing docs hold what they promise: links inside the repository, examples that run, and the fleet's
quick start and migration steps as the code does them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from exporter.__main__ import parser
from tests.support import FakeApi

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def section(text: str, heading: str) -> str:
    """The text under a `## heading`, up to the next heading of that level."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_stays_inside_the_repository_and_exists(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
        assert path.exists(), f"{page.name} links to a missing file: {target}"


async def test_the_documented_create_call_works_as_written(fake_api: FakeApi) -> None:
    text = (ROOT / "README.md").read_text()
    match = re.search(
        r"curl -s -X POST http://127\.0\.0\.1:8990(\S+) -H '([^']+)' \\\n\s+-H '([^']+)' -d '([^']+)'", text
    )
    assert match, "README shows the create call with its key and body"
    path, *headers, body = match.groups()
    header_map = dict(h.split(": ", 1) for h in headers)
    assert header_map["Authorization"] == "Bearer sk-ai-v1-demo"
    async with httpx.AsyncClient(base_url=fake_api.url) as client:
        response = await client.post(path, headers=header_map, content=body)
        assert response.status_code == 200, response.text
        created = response.json()
        for field, given in json.loads(body).items():
            assert created[field] == given
        assert created["id"] and created["usage"]
        # Every field the README names is one the API takes; one it does not name is refused.
        named = re.findall(r"`(\w+)` \(", section(text, "The simulated ZenMux API").split("Unknown fields")[0])
        assert set(named) >= {"model", "api", "streamed", "id_style"}
        sample = {"model": "openai/gpt-4.1", "api": "chat.completions", "streamed": True, "id_style": "gen"}
        accepted = await client.post(path, headers=header_map, json={k: sample[k] for k in named if k in sample})
        assert accepted.status_code == 200, accepted.text
        refused = await client.post(path, headers=header_map, json={"colour": "blue"})
        assert refused.status_code == 400 and "colour" in refused.text


def test_the_fleet_quick_start_comes_first_and_its_command_exists() -> None:
    fleet = (ROOT / "docs" / "fleet.md").read_text()
    first = re.search(r"\n## (.+)\n", fleet.split("## Contents")[1].split("\n- ", 1)[1])
    assert first and first.group(1) == "Quick start"
    quick = section(fleet, "Quick start")
    (command,) = re.findall(r"zenmux-exporter (demo --fleet \S+)", quick)
    args = parser().parse_args(command.split())
    assert args.fleet.startswith("postgresql://") and args.listen == "127.0.0.1:9466"
    assert "curl -s http://127.0.0.1:9466/metrics | grep zenmux_cost_usd_total" in quick
    setup = section((ROOT / "README.md").read_text(), "Set up")
    assert "demo --fleet" in setup and "(docs/fleet.md#quick-start)" in setup


def test_the_migration_step_sets_the_roles_so_the_old_sidecar_only_ingests() -> None:
    migration = section((ROOT / "docs" / "fleet.md").read_text(), "Migrating from sidecar mode")
    durable = migration.split("- **An exporter with durable state**")[1].split("\n- **")[0]
    assert "roles: [ingest]" in durable
    assert re.search(r"^\s+roles: \[ingest\]", durable, re.MULTILINE), "the example config sets it"
