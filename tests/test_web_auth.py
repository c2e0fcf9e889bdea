"""/metrics behind the exporter-toolkit web config: real TLS (a self-signed cert made here) and bcrypt basic auth."""

from __future__ import annotations

import asyncio
import base64
import ssl
import subprocess
import sys
from pathlib import Path

import bcrypt
import httpx
import pytest
import yaml

from exporter.config import ConfigError
from exporter.webconfig import load_web_config
from tests.support import FakeApi, StartExporter, make_cert, make_config, value, wait_until, write_config

PASSWORD = "correct horse battery staple"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def hashed(password: str, prefix: str = "$2y$") -> str:
    # htpasswd and exporter-toolkit's docs write $2y$; Python's bcrypt writes $2b$: the same algorithm.
    return prefix + bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()[4:]


async def test_tls_and_basic_auth(tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter) -> None:
    cert, key = make_cert(tmp_path)
    web = write_config(
        tmp_path / "web.yml",
        {
            "tls_server_config": {"cert_file": cert.name, "key_file": key.name},  # relative to the web config
            "basic_auth_users": {"prometheus": hashed(PASSWORD), "grafana": hashed("other", "$2b$")},
        },
    )
    config = make_config(tmp_path, fake_api.url, metrics={"web_config_file": str(web)})
    exporter = await start_exporter(config)
    base = f"https://127.0.0.1:{exporter.metrics_port}"
    trusted = ssl.create_default_context(cafile=str(cert))
    async with httpx.AsyncClient(base_url=base, verify=trusted) as client:
        anonymous = await client.get("/metrics")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Basic realm=")
        assert "zenmux" not in anonymous.text
        assert (await client.get("/metrics", headers=basic("prometheus", "wrong"))).status_code == 401
        assert (await client.get("/metrics", headers=basic("nobody", PASSWORD))).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": "Basic !!notbase64"})).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer x"})).status_code == 401
        assert (await client.get("/", headers=basic("prometheus", "wrong"))).status_code == 401
        for _ in range(3):  # the second and third check come from the verified cache
            ok = await client.get("/metrics", headers=basic("prometheus", PASSWORD))
            assert ok.status_code == 200
            assert "zenmux_exporter_build_info" in ok.text
        assert (await client.get("/metrics", headers=basic("grafana", "other"))).status_code == 200
        # The probes stay open: kubelet calls them without credentials and they reveal nothing.
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
    # No plaintext on the TLS port, and an untrusting client refuses the self-signed cert.
    async with httpx.AsyncClient() as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(f"http://127.0.0.1:{exporter.metrics_port}/metrics")
    async with httpx.AsyncClient() as untrusting:
        with pytest.raises(httpx.ConnectError):
            await untrusting.get(f"{base}/metrics")
    async with httpx.AsyncClient(base_url=base, verify=trusted) as client:  # still serving after all that
        assert (await client.get("/metrics", headers=basic("prometheus", PASSWORD))).status_code == 200


async def test_a_flood_of_wrong_passwords_does_not_stall_scrapes(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    # ~0.2 s a check (production hashes cost 10-12): the 40 guesses keep the two checkers busy for seconds, far
    # longer than a scrape takes even on a loaded machine.
    slow_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(12)).decode()
    web = write_config(tmp_path / "web.yml", {"basic_auth_users": {"prometheus": slow_hash}})
    exporter = await start_exporter(make_config(tmp_path, fake_api.url, metrics={"web_config_file": str(web)}))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{exporter.metrics_port}", timeout=60) as client:
        assert (await client.get("/metrics", headers=basic("prometheus", PASSWORD))).status_code == 200
        attack = [asyncio.create_task(client.get("/metrics", headers=basic("prometheus", f"guess{i}")))
                  for i in range(40)]

        async def guesses_at_the_server() -> bool:  # the server counts their connections open
            scraped = await client.get("/metrics", headers=basic("prometheus", PASSWORD))
            return value(scraped.text, "zenmux_exporter_http_connections") >= len(attack)

        await wait_until(guesses_at_the_server, what="a scrape answered with the 40 guesses open at the server")
        assert (await client.get("/metrics", headers=basic("prometheus", PASSWORD))).status_code == 200
        # Checked two at a time, the guesses take seconds of bcrypt; a scrape queued behind them would be
        # answered after the last one.
        assert not all(guess.done() for guess in attack), "the scrape waited for every guess"
        assert {r.status_code for r in await asyncio.gather(*attack)} == {401}


async def test_tls_only_and_basic_auth_only(tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter) -> None:
    cert, key = make_cert(tmp_path)
    tls_only = write_config(tmp_path / "tls.yml", {"tls_server_config": {"cert_file": str(cert),
                                                                             "key_file": str(key)}})
    exporter = await start_exporter(make_config(tmp_path, fake_api.url, metrics={"web_config_file": str(tls_only)}))
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert))) as client:
        assert (await client.get(f"https://127.0.0.1:{exporter.metrics_port}/metrics")).status_code == 200
    await exporter.stop(drain_seconds=0)
    auth_only = write_config(tmp_path / "auth.yml", {"basic_auth_users": {"prometheus": hashed(PASSWORD)}})
    exporter = await start_exporter(make_config(tmp_path, fake_api.url, metrics={"web_config_file": str(auth_only)}))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{exporter.metrics_port}") as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=basic("prometheus", PASSWORD))).status_code == 200


async def test_client_certificates(tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter) -> None:
    ca = make_cert(tmp_path, "ca")
    server = make_cert(tmp_path, "server", ca=ca)
    client_cert = make_cert(tmp_path, "client", ca=ca)
    web = write_config(
        tmp_path / "web.yml",
        {
            "tls_server_config": {
                "cert_file": str(server[0]),
                "key_file": str(server[1]),
                "client_ca_file": str(ca[0]),
                "client_auth_type": "RequireAndVerifyClientCert",
                "min_version": "TLS13",
            }
        },
    )
    with pytest.raises(ConfigError, match=r"metrics\.probe_listen"):  # the kubelet has no client certificate
        await start_exporter(make_config(tmp_path, fake_api.url, metrics={"web_config_file": str(web)}))
    exporter = await start_exporter(make_config(tmp_path, fake_api.url, metrics={
        "web_config_file": str(web), "probe_listen": "127.0.0.1:0"}))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{exporter.probe_port}") as plain:
        assert (await plain.get("/healthz")).status_code == 200
        assert (await plain.get("/readyz")).status_code == 200
        assert (await plain.get("/metrics")).status_code == 404  # only the probes, without a certificate
    url = f"https://127.0.0.1:{exporter.metrics_port}/metrics"
    without = ssl.create_default_context(cafile=str(ca[0]))
    async with httpx.AsyncClient(verify=without) as client:
        with pytest.raises(httpx.HTTPError):
            await client.get(url)
    with_cert = ssl.create_default_context(cafile=str(ca[0]))
    with_cert.load_cert_chain(client_cert[0], client_cert[1])
    async with httpx.AsyncClient(verify=with_cert) as client:
        assert (await client.get(url)).status_code == 200


def test_bad_web_configs_list_every_problem_without_echoing_secrets(tmp_path: Path) -> None:
    web = write_config(
        tmp_path / "web.yml",
        {
            "tls_server_config": {"cert_file": "missing.crt", "key_file": "missing.key", "bogus": 1},
            "basic_auth_users": {"alice": "plain-text-password", "bob:x": hashed("pw")},
            "nonsense": True,
        },
    )
    with pytest.raises(ConfigError) as caught:
        load_web_config(web)
    message = str(caught.value)
    for fragment in ("nonsense", "tls_server_config.bogus", "cannot load cert_file", "basic_auth_users.alice",
                     "basic_auth_users.bob:x"):
        assert fragment in message, fragment
    assert "plain-text-password" not in message
    with pytest.raises(ConfigError, match="cannot read"):
        load_web_config(tmp_path / "absent.yml")
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        load_web_config(write_config(tmp_path / "half.yml", {"tls_server_config": {"cert_file": "x"}}))
    with pytest.raises(ConfigError, match="client_ca_file"):
        load_web_config(write_config(tmp_path / "mtls.yml", {"tls_server_config": {
            "cert_file": "x", "key_file": "y", "client_auth_type": "RequireAndVerifyClientCert"}}))


async def test_exporter_refuses_to_start_with_a_bad_web_config(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    web = write_config(tmp_path / "web.yml", {"basic_auth_users": {"alice": "hunter2"}})
    with pytest.raises(ConfigError, match="bcrypt"):
        await start_exporter(make_config(tmp_path, fake_api.url, metrics={"web_config_file": str(web)}))
    assert not (tmp_path / "state.db").exists(), "nothing is opened before the config is known good"
    config = tmp_path / "config.yaml"
    from tests.support import config_data

    config.write_text(yaml.safe_dump(config_data(tmp_path, fake_api.url, metrics={"web_config_file": str(web)})))
    checked = subprocess.run([sys.executable, "-m", "exporter", "check-config", "--config", str(config)],
                             capture_output=True, text=True)
    assert checked.returncode == 2
    assert "basic_auth_users.alice" in checked.stderr
    assert "hunter2" not in checked.stderr + checked.stdout


def test_an_unknown_user_is_checked_at_the_configured_cost() -> None:
    """A wrong user name must cost as much bcrypt work as a wrong password, or user names leak by timing."""
    import bcrypt

    from exporter.webconfig import WebConfig

    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(6))
    config = WebConfig(None, {"prometheus": hashed})
    assert config._dummy_hash.split(b"$")[2] == b"06"


async def peer_certificate(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


async def test_certificates_are_reloaded_when_their_files_change(tmp_path: Path) -> None:
    from exporter.web import HttpServer, Request, Response
    from exporter.webconfig import RELOAD_CHECK_SECONDS, ReloadingContext

    cert, key = make_cert(tmp_path)
    loaded = load_web_config(write_config(tmp_path / "web.yml", {
        "tls_server_config": {"cert_file": str(cert), "key_file": str(key)}}))
    assert loaded.tls is not None
    now = [0.0]
    reloading = ReloadingContext(loaded.tls.settings, clock=lambda: now[0])

    async def ok(_: Request) -> Response:
        return Response(200, b"ok\n")

    server = HttpServer(ok, "127.0.0.1", 0, ssl_context=reloading)
    await server.start()
    try:
        first = await peer_certificate(server.port)
        make_cert(tmp_path)  # cert-manager writes a new pair in place
        assert await peer_certificate(server.port) == first  # not looked at again within the check interval
        now[0] += RELOAD_CHECK_SECONDS
        second = await peer_certificate(server.port)
        assert second != first and reloading.reloads == 1
        key.write_text("half written")  # a rotation caught half way: the last good pair is served
        now[0] += RELOAD_CHECK_SECONDS
        assert await peer_certificate(server.port) == second
    finally:
        await server.close()


@pytest.mark.parametrize(("tls", "http", "fragment"), [
    ({"client_auth_type": "RequestClientCert"}, None, "RequestClientCert (a client certificate asked for"),
    ({"client_auth_type": "RequireAnyClientCert"}, None, "RequireAnyClientCert (a client certificate asked for"),
    ({"cipher_suites": ["TLS_AES_128_GCM_SHA256"]}, None, "tls_server_config.cipher_suites: exporter-toolkit's"),
    ({"client_allowed_sans": ["x"]}, None, "client_allowed_sans"),
    ({"max_version": "TLS12", "min_version": "TLS13"}, None, "max_version: is below min_version"),
    ({}, {"http2": True}, "http_server_config.http2: HTTP/2 is not supported"),
    ({}, {"headers": {"X-Powered-By": "me"}}, "http_server_config.headers.X-Powered-By: not one of"),
    ({}, {"rate_limit": {"burst": 1}}, "http_server_config.rate_limit: not supported"),
])
def test_what_exporter_toolkit_has_and_we_do_not_is_refused_by_name(
    tmp_path: Path, tls: dict[str, object], http: dict[str, object] | None, fragment: str
) -> None:
    cert, key = make_cert(tmp_path)
    data: dict[str, object] = {"tls_server_config": {"cert_file": str(cert), "key_file": str(key),
                                                     "client_ca_file": str(cert), **tls}}
    if http is not None:
        data["http_server_config"] = http
    with pytest.raises(ConfigError) as caught:
        load_web_config(write_config(tmp_path / "web.yml", data))
    assert fragment in str(caught.value)


async def test_http_server_config_headers_are_sent_and_long_passwords_refused(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, caplog: pytest.LogCaptureFixture
) -> None:
    long_password = "p" * 73
    web = write_config(tmp_path / "web.yml", {
        "http_server_config": {"http2": False, "headers": {"X-Content-Type-Options": "nosniff",
                                                           "X-Frame-Options": ""}},
        "basic_auth_users": {"prometheus": hashed(long_password[:72])},
    })
    exporter = await start_exporter(make_config(tmp_path, fake_api.url, metrics={"web_config_file": str(web)}))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{exporter.metrics_port}") as client:
        probe = await client.get("/healthz")
        assert probe.headers["x-content-type-options"] == "nosniff" and "x-frame-options" not in probe.headers
        assert (await client.get("/metrics", headers=basic("prometheus", long_password[:72]))).status_code == 200
        # bcrypt would read only the first 72 bytes: a longer password is refused, with a log line saying why.
        assert (await client.get("/metrics", headers=basic("prometheus", long_password))).status_code == 401
    assert "passwords over 72 bytes" in caplog.text
