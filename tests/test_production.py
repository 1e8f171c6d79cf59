"""One server as a team runs it: mTLS, a scoped keys file and metrics, seen from outside through
the real client; its request log as JSON lines. Certificates are made here."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import logging
import re
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from supportqa.client import TLS, AsyncSupportClient, SupportQAError

pytestmark = pytest.mark.slow

KEYS = {"writer-alpha": "w-secret-1", "reader-alpha": "r-secret-2", "admin": "a-secret-3",
        "late": "l-secret-4", "two": "t-secret-5"}


def _cert(subject: str, issuer_key, issuer_name, *, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    if not ca:
        b = b.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
    return key, b.sign(issuer_key or key, hashes.SHA256()), name


def _write(path, key, cert) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path.with_suffix(".pem")), str(path.with_suffix(".key"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, ca_name = _cert("supportqa test CA", None, None, ca=True)
    ca_pem, _ = _write(d / "ca", ca_key, ca_cert)
    server = _write(d / "server", *_cert("localhost", ca_key, ca_name, server=True)[:2])
    client = _write(d / "client", *_cert("bot", ca_key, ca_name)[:2])
    return {"ca": ca_pem, "server": server, "client": client, "dir": d}


def _keys_file(path, names) -> None:
    scopes = {"writer-alpha": ("writer", ["alpha"]), "reader-alpha": ("reader", ["alpha"]),
              "admin": ("admin", ["*"]), "late": ("reader", ["*"]),
              "two": ("reader", ["alpha", "gamma"])}
    path.write_text(json.dumps([
        {"name": n, "key_sha256": hashlib.sha256(KEYS[n].encode()).hexdigest(),
         "role": scopes[n][0], "knowledge_bases": scopes[n][1]} for n in names]))


@pytest.fixture(scope="module")
async def prod(pki, tmp_path_factory):
    from supportqa_server.api.server import create_server
    from supportqa_server.runtime.settings import Settings

    d = tmp_path_factory.mktemp("prod")
    keys = d / "keys.json"
    _keys_file(keys, ["writer-alpha", "reader-alpha", "admin", "two"])
    settings = Settings(
        port=0, data_dir=d / "data", speech_model="", ocr=False, clip_model="",
        metrics_port=0, api_keys_file=keys, tls_cert=pki["server"][0], tls_key=pki["server"][1],
        tls_client_ca=pki["ca"], head_weight=0.0, head_weight_voice=0.0,
    )
    settings.metrics_port = _free_port()
    app, port = create_server(settings)
    await app.start()
    await app.load()
    try:
        yield app, f"localhost:{port}", keys
    finally:
        await app.stop(0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(pki, target, key=None, cert=True) -> AsyncSupportClient:
    tls = TLS(pki["ca"], *(pki["client"] if cert else (None, None)))
    return AsyncSupportClient(target, api_key=key, tls=tls, retries=0, timeout=30)


ENTRY = {"id": "lost", "answer": "Freeze the card in the app.",
         "questions": ["I lost my card", "my card is gone"]}


async def test_tls_works_and_plaintext_or_no_client_certificate_fails(prod, pki):
    _, target, _ = prod
    async with _client(pki, target, KEYS["admin"]) as c:
        assert (await c.stats()).components  # a call over mTLS
    async with AsyncSupportClient(target, api_key=KEYS["admin"], retries=0, timeout=5) as c:
        with pytest.raises(SupportQAError) as e:
            await c.stats()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    async with _client(pki, target, KEYS["admin"], cert=False) as c:
        with pytest.raises(SupportQAError) as e:
            await c.stats()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


async def test_health_is_open_without_a_key(prod, pki):
    _, target, _ = prod
    creds = grpc.ssl_channel_credentials(
        open(pki["ca"], "rb").read(), open(pki["client"][1], "rb").read(),
        open(pki["client"][0], "rb").read())
    async with grpc.aio.secure_channel(target, creds) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_keys_are_scoped_by_role_and_knowledge_base(prod, pki):
    _, target, _ = prod
    async with _client(pki, target) as c:
        with pytest.raises(SupportQAError) as e:
            await c.ask("hello", knowledge_base="alpha")
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with _client(pki, target, "not-a-key") as c:
        with pytest.raises(SupportQAError) as e:
            await c.stats()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with _client(pki, target, KEYS["admin"]) as c:
        await c.upsert([{**ENTRY, "knowledge_base": "beta"}])
    async with _client(pki, target, KEYS["writer-alpha"]) as c:
        summary = await c.upsert([{**ENTRY, "knowledge_base": "alpha"}])
        assert summary.written == 1
        with pytest.raises(SupportQAError) as e:
            await c.upsert([{**ENTRY, "knowledge_base": "beta"}])
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    async with _client(pki, target, KEYS["reader-alpha"]) as c:
        result = await c.ask("my card is lost", knowledge_base="alpha")
        assert result.answers[0].entry_id == "lost"
        for call in (c.ask("my card is lost", knowledge_base="beta"),
                     c.upsert([{**ENTRY, "knowledge_base": "alpha"}]),
                     c.delete(["lost"], knowledge_base="alpha"),
                     c.get("lost", knowledge_base="beta")):
            with pytest.raises(SupportQAError) as e:
                await call
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "beta" not in e.value.details or "'beta'" in e.value.details  # its own ask
        assert [kb.name for kb in (await c.stats()).knowledge_bases] == ["alpha"]
        # A reader for every knowledge base sees no name of those outside its scope ...
    _keys_file(prod[2], ["writer-alpha", "reader-alpha", "admin", "two", "late"])
    async with _client(pki, target, KEYS["late"]) as c:  # ... once SIGHUP's reload runs
        with pytest.raises(SupportQAError) as e:
            await c.stats()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        prod[0].keys.reload()
        assert {kb.name for kb in (await c.stats()).knowledge_bases} >= {"alpha", "beta"}
    async with _client(pki, target, KEYS["writer-alpha"]) as c:
        with pytest.raises(SupportQAError) as e:
            await c.ask("x", knowledge_base="alpha_typo")
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED  # outside its scope
    for key, listed in (("two", "existing: alpha."), ("admin", "existing: alpha, beta.")):
        async with _client(pki, target, KEYS[key]) as c:
            with pytest.raises(SupportQAError) as e:
                await c.ask("x", knowledge_base="gamma")
            assert e.value.code == grpc.StatusCode.NOT_FOUND
            assert listed in e.value.details  # only the knowledge bases the key may see


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_metrics_count_each_answered_ask(prod, pki):
    app, target, _ = prod
    async with _client(pki, target, KEYS["admin"]) as c:
        await c.upsert([{**ENTRY, "knowledge_base": "alpha"}])
        before = _scrape(app.metrics_port)
        n = 5
        for _ in range(n):
            await c.ask("I lost my card", knowledge_base="alpha")
        await c.ask("what is the capital of peru", knowledge_base="alpha", min_score=0.99)
        from supportqa_tools.evaluation import wait_for_head

        await wait_for_head(c, "alpha")  # one entry: the head turns "off" once it has looked
    after = _scrape(app.metrics_port)
    ok = {"grpc_method": "Ask", "grpc_code": "OK", "grpc_service": "supportqa.v1.Answering"}
    assert (_value(after, "grpc_server_handled_total", **ok)
            - _value(before, "grpc_server_handled_total", **ok)) == n + 1
    answered = dict(knowledge_base="alpha", modality="text", outcome="answered")
    assert (_value(after, "supportqa_questions_total", **answered)
            - _value(before, "supportqa_questions_total", **answered)) == n
    assert _value(after, "supportqa_questions_total", outcome="no_answer") >= 1
    assert _value(after, "supportqa_entries", knowledge_base="alpha") == 1
    assert 'supportqa_entry_head{knowledge_base="alpha",state="off"} 1.0' in after
    assert _value(after, "grpc_server_handling_seconds_count", grpc_method="Ask") >= n
    assert _value(after, "supportqa_stage_seconds_count", stage="search") >= n
    assert _value(after, "supportqa_batch_size_count", model="text encoder") >= 1
    assert "supportqa_queue_depth" in after and "supportqa_answer_confidence_bucket" in after


async def test_request_log_is_one_masked_json_line_per_call_and_never_a_key(prod, pki, caplog):
    from supportqa_server.runtime.logs import JsonFormatter

    _, target, _ = prod
    question = "card 4111 1111 1111 1111 lost, mail a.b@example.com or call +44 20 7946 0958"
    with caplog.at_level(logging.INFO, logger="supportqa.requests"):
        async with _client(pki, target, KEYS["reader-alpha"]) as c:
            await c.ask(question, knowledge_base="alpha")
            with pytest.raises(SupportQAError):
                await c.ask("x", knowledge_base="beta")
    lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "supportqa.requests"]
    docs = [json.loads(line) for line in lines]
    assert [(d["method"], d["code"]) for d in docs] == [("Ask", "OK"),
                                                        ("Ask", "PERMISSION_DENIED")]
    first = docs[0]
    assert re.fullmatch(r"[0-9a-f]{32}", first["request_id"])
    assert first["knowledge_base"] == "alpha" and first["modality"] == "text"
    assert first["outcome"] in ("answered", "no_answer") and "search" in first["timings_ms"]
    assert first["caller"]["key"] == "reader-alpha"
    assert first["question"] == "card [card] lost, mail [email] or call [phone]"
    assert docs[1]["outcome"] == "error"
    for line in lines:
        assert not any(k in line for k in KEYS.values())
        assert "4111" not in line and "example.com" not in line


def test_masking():
    from supportqa_server.api.observe import mask

    assert mask("my card 4111-1111-1111-1111") == "my card [card]"
    assert mask("4111111111111111 and 5500 0000 0000 0004") == "[card] and [card]"
    assert mask("write to jo.smith+help@mail.example.co.uk") == "write to [email]"
    assert mask("ring me on (020) 7946-0958") == "ring me on [phone]"
    assert mask("error 402 on order 12345, step 3") == "error 402 on order 12345, step 3"


def test_a_bad_keys_file_stops_the_server_with_what_is_wrong(tmp_path):
    from supportqa_server.api.server import create_server
    from supportqa_server.errors import InvalidInput
    from supportqa_server.runtime.settings import Settings

    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps([{"name": "x", "key_sha256": "abc", "role": "reader"}]))
    with pytest.raises(InvalidInput, match="64 hex digits"):
        create_server(Settings(port=0, data_dir=tmp_path, api_keys_file=bad))


async def test_cli_and_load_generator_speak_mtls_with_a_key(prod, pki, tmp_path, capsys):
    import asyncio

    from supportqa import bench
    from supportqa import cli as client_cli

    _, target, _ = prod
    tls = ["--ca", pki["ca"], "--cert", pki["client"][0], "--key", pki["client"][1]]
    argv = ["--target", target, *tls, "--api-key", KEYS["reader-alpha"], "stats"]
    assert await asyncio.to_thread(client_cli.main, argv) == 0
    assert "alpha" in capsys.readouterr().out
    questions = tmp_path / "q.txt"
    questions.write_text("I lost my card\n")
    argv = ["--target", target, *tls, "--api-key", KEYS["reader-alpha"], "--text",
            str(questions), "--knowledge-base", "alpha", "--requests", "4", "-c", "2"]
    assert await asyncio.to_thread(bench.main, argv) == 0
    assert "ok" in capsys.readouterr().out.lower()
    argv = ["--target", target, "--text", str(questions), "--requests", "2"]  # plaintext
    assert await asyncio.to_thread(bench.main, argv) != 0


async def test_a_metrics_port_in_use_says_what_to_do(tmp_path):
    import socket

    from supportqa_server.api.server import create_server
    from supportqa_server.errors import InvalidInput
    from supportqa_server.runtime.settings import Settings

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app, _ = create_server(Settings(port=0, data_dir=tmp_path, metrics_port=port))
        with pytest.raises(InvalidInput, match="SUPPORTQA_METRICS_PORT"):
            await app.start()
