"""Process settings: typed, from SUPPORTQA_* environment variables or an optional file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

KB_NAME_PATTERN = r"^[A-Za-z0-9_]{1,64}$"
DEFAULT_KB = "default"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "supportqa"


class Settings(BaseSettings):
    """Everything a deployment can change; defaults work offline on a 2-core CPU machine."""

    # Each field's docstring is its meaning in the README's configuration table
    # (scripts/gen_settings_doc.py); the reasons behind the defaults are in docs/decisions.md.
    model_config = SettingsConfigDict(
        env_prefix="SUPPORTQA_",
        env_file=os.environ.get("SUPPORTQA_SETTINGS_FILE"),
        extra="ignore",
        use_attribute_docstrings=True,
    )

    # Transport
    host: str = "127.0.0.1"
    """Bind address; 0.0.0.0 accepts other machines (the Docker image sets it)."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    max_message_bytes: int = 32 * 1024 * 1024
    """Largest gRPC message, both ways (gRPC's own default is 4 MiB)."""
    api_keys: list[str] = Field(default_factory=list)
    """Keys callers send as `authorization: Bearer KEY` (JSON list), each an admin key; with
    neither this nor api_keys_file set, no authentication."""
    api_keys_file: Path | None = None
    """JSON list of scoped keys: `{"name", "key_sha256", "role": "reader"|"writer"|"admin",
    "knowledge_bases": [names or "*"]}`; re-read on SIGHUP."""
    tls_cert: Path | None = None
    """PEM certificate chain the server presents; with tls_key, the port serves TLS only."""
    tls_key: Path | None = None
    """PEM private key of tls_cert."""
    tls_client_ca: Path | None = None
    """PEM CA bundle; when set, callers must present a client certificate it signed (mTLS)."""
    grace_seconds: float = 5.0
    """Seconds in-flight calls get to finish after SIGTERM."""

    # Operations
    metrics_port: int = 9464
    """Port of the Prometheus endpoint `http://HOST:PORT/metrics` (on `host`); 0: off."""
    log_format: Literal["text", "json"] = "text"
    """`text` or `json` (one JSON object per line on stderr, one per request)."""
    tracing: bool = False
    """OpenTelemetry spans: one per RPC and one per stage of a question (the `tracing` extra;
    exported over OTLP as the standard `OTEL_*` variables say)."""
    log_questions: Literal["masked", "raw", "off"] = "masked"
    """Question texts and transcripts in request logs: `masked` (card numbers, e-mail
    addresses and phone numbers replaced), `raw`, or `off`."""

    # Store
    data_dir: Path = Path("data")
    """Folder of the Milvus Lite file (`milvus.db`); one server per folder (it is locked)."""
    cache_dir: Path = DEFAULT_CACHE_DIR
    """Converted Whisper checkpoints, extracted text models and exported ONNX text encoders,
    shared by every data folder."""
    milvus_uri: str = ""
    """Milvus standalone/cluster URI (`http://host:19530`); empty: Milvus Lite in data_dir."""
    milvus_token: str = ""
    """`user:password` or an API key for a Milvus server."""
    milvus_db: str = ""
    """Database on a Milvus server; empty: its default."""
    store_poll_seconds: float = 1.0
    """On a Milvus server: how often each replica checks for the other replicas' writes, and
    for Milvus coming back after an outage (s)."""

    # Models
    device: str = "auto"
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps`."""
    precision: str = "auto"
    """Number format of the models: `auto` (float16 on CUDA, bfloat16 on CPUs with AMX or
    AVX512-BF16, else float32), `float32`, `bfloat16`, `float16` (GPU only)."""
    text_model: str = ""
    """Sentence encoder: a local path or cached hub id; empty: the bundled all-MiniLM-L6-v2;
    `all-mpnet-base-v2`: the larger model of the `mpnet` extra."""
    text_runtime: Literal["auto", "torch", "onnx-float32", "onnx-int8"] = "auto"
    """What runs the sentence encoder: `torch`; `onnx-float32` or `onnx-int8` (onnxruntime on
    the CPU; the graph is exported once into cache_dir); `auto`: torch off the CPU, and on the
    CPU whichever of the three is fastest on this machine for the bundled MiniLM (timed once
    per CPU and remembered in cache_dir); other models stay on torch."""
    speech_model: str = "tiny.en"
    """Whisper model: `tiny.en`, `base`, any openai-whisper name or `.pt` path; empty: voice off."""
    speech_trim: bool = True
    """Encode only the speech sent, not Whisper's 30 s of padding."""
    speech_beam_size: int = Field(5, ge=0, le=16)
    """Beams of Whisper's beam search; 0: greedy (faster, less accurate)."""
    speech_lm_weight: float = Field(0.3, ge=0.0, le=2.0)
    """Weight of the knowledge base's own language model in Whisper's decoding; 0: off."""
    speech_nbest: int = Field(1, ge=1, le=8)
    """Transcripts of a spoken question searched: the beam search's best and up to N-1 other
    hypotheses, each list weighted by its text's probability relative to the best's and fused
    (the confidence is the best any hypothesis gives); 1: the best only."""
    speech_nbest_min: float = Field(0.05, ge=0.0, le=1.0)
    """A hypothesis less probable than this, relative to the best, is not searched."""
    clip_model: str = ""
    """CLIP path or cached hub id (e.g. `openai/clip-vit-base-patch32`); empty: See route off."""
    ocr: bool = True
    """Read text in images with rapidocr."""

    # Articles
    passage_tokens: int = 200
    """Most word pieces of one passage of an article or of a long answer, before its title
    and headings: the bundled MiniLM reads 256, and the heading path takes the rest."""
    max_article_bytes: int = 2 * 1024 * 1024
    """Largest article body (UTF-8) one entry may carry; it is split into passages (~3,000
    for 2 MB of prose, whose offsets fill most of an entry's 64 KB record)."""

    # Limits on what a question may carry
    max_text_chars: int = 2000
    """Characters of question text."""
    max_audio_seconds: float = 60.0
    """Seconds of speech per question."""
    max_image_bytes: int = 20 * 1024 * 1024
    """Encoded size of an image."""
    max_image_pixels: int = 40_000_000
    """Width x height of an image (decompression bombs are refused from the header)."""
    max_image_decode_bytes: int = 160 * 1024 * 1024
    """Memory one image may take while decoded; a JPEG over it is decoded at 1/2, 1/4 or 1/8
    scale, other formats are refused with RESOURCE_EXHAUSTED."""
    stream_idle_seconds: float = Field(30.0, gt=0.0)
    """A Converse stream that sends nothing for this long is ended (DEADLINE_EXCEEDED)."""
    max_stream_audio_bytes: int = 12 * 1024 * 1024
    """Audio one Converse stream may buffer (12 MiB: 60 s of 48 kHz stereo WAV)."""
    max_buffered_audio_bytes: int = 256 * 1024 * 1024
    """Audio all open Converse streams may buffer together; beyond it RESOURCE_EXHAUSTED."""

    # Ranking
    threshold: float | None = None
    """Confidence below which the reply is NoAnswer, pinned for every knowledge base; unset:
    each knowledge base calibrates its own (calibrate)."""
    thresholds: dict[str, float] = Field(default_factory=dict)
    """Pinned thresholds per knowledge base, JSON: `{"banking": 0.5}`."""
    calibrate: bool = True
    """Derive each knowledge base's threshold from its own paraphrases and a general
    out-of-scope pool after every write (answering/calibration.py)."""
    fallback_threshold: float = Field(0.44, ge=0.0, le=1.0)
    """Threshold while a knowledge base's calibration is pending or impossible (fewer than 20
    paraphrases to hold out, as in a knowledge base of articles)."""
    lexical: bool = True
    """Keep a BM25 index (needed for lexical_weight above 0)."""
    aggregation: str = "mean_top"
    """How an entry's rows score it: `max`, `mean_top` (mean of its best top_rows), `knn`."""
    top_rows: int = 3
    """Rows averaged by `mean_top` (aggregation and confidence)."""
    knn: int = 20
    """Neighbours voting when aggregation is `knn`."""
    knn_temperature: float = 0.1
    """Softmax temperature of the kNN vote, in cosine units."""
    fusion: str = "score"
    """How BM25 joins the dense route: `score` (its share added) or `rrf` (reciprocal ranks)."""
    lexical_weight: float = 0.2
    """Weight of the BM25 route; 0: dense only, no BM25 search."""
    confidence: str = "mean_top"
    """Score compared with the threshold: `mean_top` or `best` (the entry's best cosine)."""
    margin_weight: float = 0.0
    """Confidence bonus per unit of the top-1/top-2 gap."""
    head_weight: float = Field(0.5, ge=0.0)
    """Weight of the entry head (a classifier over each knowledge base's rows, retrained after
    writes) in the ranking of typed and read questions; 0: off. It orders, never scores."""
    head_weight_voice: float = Field(0.0, ge=0.0)
    """The entry head's weight for transcribed questions."""
    clarify_margin: float = Field(0.03, ge=0.0, le=1.0)
    """Confident answers whose confidences lie within this of the first's are offered in a
    Clarify ("did you mean A or B?") before the answers; 0: never."""
    head_confidence: float = Field(0.3, ge=0.0)
    """Weight of the entry head's probability in the confidence, `(cosine + w * p) / (1 +
    w)`, where a head is trained; 0: the cosine alone."""
    head_c: float = Field(10.0, gt=0.0)
    """Inverse regularisation of the entry head's fit."""
    head_words: bool = True
    """The entry head also reads the question's words (TF-IDF), beside its vector."""
    head_max_rows: int = Field(100_000, ge=0)
    """Knowledge bases with more rows go without an entry head."""

    # Concurrency
    max_batch: int = 64
    """Questions per text/CLIP encoder call; 1 turns batching off."""
    text_token_budget: int = Field(0, ge=0)
    """On the CPU, the most padded tokens (texts times the longest, in word pieces) in one
    forward pass of the text encoder: a batch is sorted by length and cut where the next text
    would pass it. 0: the budget this CPU embeds a batch fastest at, measured at the first
    start (a few seconds) and cached in SUPPORTQA_CACHE_DIR."""
    max_wait_ms: float = 0.0
    """How long a text/CLIP batch waits to fill; 0: batches fill with what queued meanwhile."""
    max_queue: int = 512
    """Queued items per model; beyond it RESOURCE_EXHAUSTED."""
    max_queue_ms: float = Field(1000.0, ge=0.0)
    """A text or image question that would wait longer than this for its model (or past its
    deadline) is refused at once with RESOURCE_EXHAUSTED; 0: only the deadline."""
    speech_max_queue_ms: float = Field(5000.0, ge=0.0)
    """The same for Whisper and OCR, whose batches take 0.1-2 s."""
    speech_max_batch: int = 8
    """Utterances per Whisper call."""
    speech_max_wait_ms: float = 20.0
    """How long a Whisper batch waits to fill, once callers are concurrent."""
    ocr_max_batch: int = 4
    """Images per OCR call."""
    speech_min_confidence: float = Field(0.5, ge=0.0, le=1.0)
    """A spoken question whose transcript's confidence (geometric mean of its token
    probabilities) is below this gets NotHeard ("please repeat") instead of answers."""
    turn_silence_ms: int = Field(700, ge=100, le=10_000)
    """In a whole-call Converse, a caller's turn ends after this much non-speech (ms) unless
    the call's ConverseConfig.end_silence_ms says otherwise."""
    partial_seconds: float = 2.0
    """Converse: a partial transcript per this much new PCM audio, in seconds."""
    torch_threads: int = 0
    """torch intra-op threads; 0: all cores."""
    store_threads: int = 4
    """Threads for Milvus writes, image searches and the entry head's reads."""

    # Question log
    question_log: bool = True
    """Keep every answered question in Milvus, per knowledge base (text masked as
    log_questions says, its vector, outcome, top scores, Feedback, conversation id), for
    Feedback and Suggest; `off`, or log_questions `off`, keeps none."""
    question_log_days: float = Field(30.0, gt=0.0)
    """Days a logged question is kept; older ones are deleted (checked every 10 minutes)."""
    question_log_max_rows: int = Field(100_000, ge=1)
    """Logged questions kept per knowledge base; beyond it the oldest are deleted."""

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both SUPPORTQA_TLS_CERT and SUPPORTQA_TLS_KEY, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("SUPPORTQA_TLS_CLIENT_CA (mTLS) needs SUPPORTQA_TLS_CERT and _KEY")
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device {v!r} is not one of auto, cpu, cuda, cuda:N, mps")

    @field_validator("precision")
    @classmethod
    def _check_precision(cls, v: str) -> str:
        from supportqa_server.runtime.devices import check_precision

        return check_precision(v)

    @field_validator("threshold")
    @classmethod
    def _check_threshold(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"threshold {v} must be within [0, 1]")
        return v

    @field_validator("max_batch", "max_queue")
    @classmethod
    def _check_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        return v

    def pinned_threshold(self, knowledge_base: str) -> tuple[float, str] | None:
        """(threshold, the setting that pins it) of one knowledge base; None: calibrated."""
        if knowledge_base in self.thresholds:
            return self.thresholds[knowledge_base], "SUPPORTQA_THRESHOLDS"
        if self.threshold is not None:
            return self.threshold, "SUPPORTQA_THRESHOLD"
        return None

