"""A real Prometheus (Debian's `prometheus`) scrapes a real server and sees every Ask."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="needs the prometheus binary (apt install prometheus; make setup)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, expr: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            result = json.load(r)["data"]["result"]
    except OSError:
        return None  # not up yet
    return sum(float(x["value"][1]) for x in result) if result else None


async def _until(port: int, expr: str, want, timeout_s: float = 60.0) -> float | None:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(_query, port, expr)
        if value is not None and want(value):
            return value
        await asyncio.sleep(0.5)
    return value


async def test_prometheus_scrapes_every_answered_ask(tmp_path):
    from supportqa.client import AsyncSupportClient
    from supportqa_server.api.server import running_server
    from supportqa_server.runtime.settings import Settings

    metrics_port, prom_port = _free_port(), _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: supportqa\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    settings = Settings(port=0, data_dir=tmp_path / "data", speech_model="", ocr=False,
                        clip_model="", metrics_port=metrics_port, head_weight=0.0,
                        head_weight_voice=0.0)
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ok = 'grpc_server_handled_total{grpc_method="Ask",grpc_code="OK"}'
    try:
        async with running_server(settings) as target:
            async with AsyncSupportClient(target) as c:
                await c.upsert([{"id": "lost", "answer": "Freeze it in the app.",
                                 "questions": ["I lost my card"]}])
                # Prometheus has scraped the server once it knows its gRPC families.
                up = await _until(prom_port, "up{job='supportqa'}", lambda v: v == 1)
                assert up == 1, "Prometheus never scraped the server"
                before = await _until(prom_port, 'grpc_server_started_total', lambda v: True)
                assert before is not None
                base = await asyncio.to_thread(_query, prom_port, ok) or 0.0
                n = 7
                for _ in range(n):
                    await c.ask("I lost my card")
                seen = await _until(prom_port, ok, lambda v: v >= base + n)
                assert seen == base + n
                answered = await _until(
                    prom_port, 'supportqa_questions_total{outcome="answered"}',
                    lambda v: v >= n)
                assert answered == n
    finally:
        prom.terminate()
        prom.wait(timeout=30)
