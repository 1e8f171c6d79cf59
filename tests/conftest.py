"""Shared fixtures: a real grpc.aio server on port 0 over a real Milvus Lite in a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE_KB = ROOT / "knowledge" / "sample.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Servers in tests serve no metrics unless a test asks: many run at once on one machine.
os.environ.setdefault("SUPPORTQA_METRICS_PORT", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: loads real models or runs for seconds")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line(
        "markers", "milvus_server: starts a real Milvus standalone server (installed from PyPI)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared evaluation data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def text_settings(tmp_path_factory: pytest.TempPathFactory):
    """Settings for a text-only server: port 0, fresh data dir, no voice/image models."""
    from supportqa_server.runtime.settings import Settings

    return Settings(
        port=0, data_dir=tmp_path_factory.mktemp("data"), speech_model="", clip_model="",
        ocr=False,
    )


@pytest.fixture(scope="session")
async def text_server(text_settings):
    """A running text server with the sample knowledge base ingested; yields its target."""
    from supportqa.client import AsyncSupportClient
    from supportqa.knowledge_file import read_entries
    from supportqa_server.api.server import running_server
    from supportqa_tools.evaluation import wait_for_head

    async with running_server(text_settings) as target:
        # A generous deadline: on a loaded machine the ingest and the head's training and
        # calibration beside it took over the client's default.
        async with AsyncSupportClient(target, timeout=180) as client:
            summary = await client.upsert(read_entries(SAMPLE_KB))
            assert summary.written == summary.received > 40
            # Tests see the ranking a settled knowledge base gets: with its entry head.
            await wait_for_head(client, "default")
        yield target



@pytest.fixture
async def client(text_server):
    from supportqa.client import AsyncSupportClient

    async with AsyncSupportClient(text_server, timeout=60) as c:
        yield c
