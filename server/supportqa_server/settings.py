"""Process settings: typed, from SUPPORTQA_* environment variables or an optional file."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

KB_NAME_PATTERN = r"^[A-Za-z0-9_]{1,64}$"
DEFAULT_KB = "default"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "supportqa"


class Settings(BaseSettings):
    """Everything a deployment can change; defaults work offline on a 2-core CPU machine."""

    model_config = SettingsConfigDict(
        env_prefix="SUPPORTQA_",
        env_file=os.environ.get("SUPPORTQA_SETTINGS_FILE"),
        extra="ignore",
    )

    # Transport
    host: str = "127.0.0.1"  # 0.0.0.0 to accept other machines (the Docker image sets it)
    port: int = 50051  # 0 picks a free port (tests)
    max_message_bytes: int = 32 * 1024 * 1024  # 32 MiB both ways; gRPC's default is 4 MiB
    api_keys: list[str] = Field(default_factory=list)  # empty: no authentication
    grace_seconds: float = 5.0  # in-flight calls get this long on SIGTERM

    # Store
    data_dir: Path = Path("data")  # the Milvus Lite file lives here
    cache_dir: Path = DEFAULT_CACHE_DIR
    # ^ converted Whisper checkpoints and extracted text models, shared by every data dir
    milvus_uri: str = ""  # empty: Milvus Lite at data_dir/milvus.db; else http://host:19530
    milvus_token: str = ""  # "user:password" or an API key for standalone/cluster/Zilliz
    milvus_db: str = ""  # database name on a standalone/cluster server; empty: default

    # Models
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # Number format models compute in: auto | float32 | bfloat16 | float16. auto: float16 on
    # CUDA, bfloat16 on CPUs with AMX/AVX512-BF16 (same answers, 2.3x the encoder's batch
    # throughput here: docs/bench_text.md), else float32.
    precision: str = "auto"
    # Local path or HF id; "" the bundled all-MiniLM-L6-v2; "all-mpnet-base-v2" the larger
    # model of the `mpnet` extra (text_models.py; +0.009 BANKING77 dev accuracy@1, docs/
    # evaluation.md)
    text_model: str = ""
    speech_model: str = "tiny.en"  # tiny.en | base | any openai-whisper name or .pt path; "" off
    speech_trim: bool = True  # encode only the speech sent, not 30 s of padding
    # Beams for Whisper's beam search; 0: greedy. With the KB language model, 5 beams put
    # voice within 0.04 of text on BANKING77 dev (greedy: 0.06) at ~2.4x greedy's decoding
    # time, ~0.33 s a clip in batches on 2 cores (docs/evaluation.md, docs/bench_voice.md).
    speech_beam_size: int = Field(5, ge=0, le=16)
    # Weight of the knowledge base's own language model in Whisper's decoding (shallow
    # fusion, biasing.py): domain words win close calls. 0.3 was best on BANKING77 dev; 0 off.
    speech_lm_weight: float = Field(0.3, ge=0.0, le=2.0)
    clip_model: str = ""  # CLIP path or hub id (e.g. openai/clip-vit-base-patch32); "" off
    ocr: bool = True  # read text from images with rapidocr

    # Limits on what a question may carry
    max_text_chars: int = 2000  # characters of question text
    max_audio_seconds: float = 60.0  # seconds of speech per question
    max_image_bytes: int = 20 * 1024 * 1024  # encoded image size
    max_image_pixels: int = 40_000_000  # width*height, against decompression bombs
    # Memory one image may take while it is decoded (pixels x bytes per pixel, plus the RGB
    # copy). A JPEG over it is decoded at 1/2, 1/4 or 1/8 scale instead; other formats are
    # refused (RESOURCE_EXHAUSTED). 160 MiB: a 4K RGBA screenshot takes 66 MB.
    max_image_decode_bytes: int = 160 * 1024 * 1024
    # Converse: a stream that sends nothing for this long is ended (DEADLINE_EXCEEDED).
    stream_idle_seconds: float = Field(30.0, gt=0.0)
    # Converse: audio one stream may buffer before it is decoded (compressed formats, whose
    # seconds are unknown until decoded; PCM is limited by max_audio_seconds as well).
    # 12 MiB: 60 s of 48 kHz stereo WAV.
    max_stream_audio_bytes: int = 12 * 1024 * 1024
    # Converse: audio all open streams may buffer together; beyond it RESOURCE_EXHAUSTED.
    max_buffered_audio_bytes: int = 256 * 1024 * 1024

    # Ranking (chosen on BANKING77 / CLINC150 dev: docs/evaluation.md)
    # NoAnswer below it: best NoAnswer F1 on CLINC150 val, bundled MiniLM with the entry head
    # (in-scope accuracy 0.946 at NA recall 0.77; 0.41 was the best before the head, where it
    # now gives 0.949 at recall 0.70: docs/evaluation.md)
    threshold: float = 0.44
    thresholds: dict[str, float] = Field(default_factory=dict)  # per knowledge base
    lexical: bool = True  # keep a BM25 index (needed for lexical_weight > 0)
    aggregation: str = "mean_top"  # rows -> entry score: max | mean_top | knn (rank.RankOptions)
    top_rows: int = 3  # rows averaged by mean_top (aggregation and confidence)
    knn: int = 20  # neighbours voting when aggregation is knn
    knn_temperature: float = 0.1  # softmax temperature of the kNN vote, cosine units
    fusion: str = "score"  # how BM25 joins: score (BM25 share added) | rrf (reciprocal ranks)
    lexical_weight: float = 0.2  # weight of the BM25 route in the fusion; 0: off, no BM25 search
    confidence: str = "mean_top"  # mean_top (mean of the entry's top_rows) | best (best cosine)
    margin_weight: float = 0.0  # confidence bonus per unit of top1-top2 gap (hurt on dev)
    # Entry head (head.py): a classifier over each knowledge base's rows, retrained after
    # writes; its probability times head_weight joins the ranking key (0: off). C and weight
    # were chosen on CLINC150 val; accuracy@1 +0.007 over four BANKING77 dev splits, +0.022 on
    # held-out CLINC150 train questions (docs/evaluation.md).
    head_weight: float = Field(0.5, ge=0.0)
    # The head's weight for transcribed questions. On 800 BANKING77 dev clips (offline,
    # benchmarks/tune_voice.py) 0.5 cost 0.007 accuracy@1 and 1.0 cost 0.019, while the typed
    # questions gained 0.017: a head fitted to clean text is overconfident on misheard words.
    head_weight_voice: float = Field(0.0, ge=0.0)
    head_c: float = Field(10.0, gt=0.0)  # inverse regularisation of the head's fit
    # The head also reads the question's words (TF-IDF of word unigrams and bigrams beside
    # the vector, head.WordFeatures): BANKING77 dev accuracy@1 +0.002 to +0.009 on four splits
    # through the API (docs/evaluation.md).
    head_words: bool = True
    head_max_rows: int = Field(100_000, ge=0)  # larger knowledge bases go without a head

    # Concurrency
    max_batch: int = 64  # questions per encoder call; 1 turns batching off
    # How long a text/CLIP batch waits to fill once its first item arrives. 0: under load,
    # batches fill with what queued while the model ran; a lone question is not held back
    # (2 ms cost 3 ms of p50 at concurrency 1 and gained nothing at 32: docs/bench_text.md).
    max_wait_ms: float = 0.0
    max_queue: int = 512  # queued items per model; beyond it RESOURCE_EXHAUSTED
    # A text or image question whose estimated wait for its model (queued batches x measured
    # batch time) passes this, or its own deadline, is refused at once with
    # RESOURCE_EXHAUSTED: under overload callers hear "retry" in milliseconds, and those
    # accepted keep their latency. 0: no limit but the deadline.
    max_queue_ms: float = Field(1000.0, ge=0.0)
    # The same for the slow models, Whisper and OCR, whose batches take 0.1-2 s.
    speech_max_queue_ms: float = Field(5000.0, ge=0.0)
    speech_max_batch: int = 8  # clips per Whisper call
    # A Whisper call takes ~100-400 ms: waiting a little for more clips costs less than
    # running a half-empty batch (docs/bench_server_voice.md). Only spent after a batch of
    # more than one clip (MicroBatcher): a lone caller's clip goes at once.
    speech_max_wait_ms: float = 20.0
    ocr_max_batch: int = 4  # images per OCR call
    partial_seconds: float = 2.0  # Converse: a partial transcript per this much new audio
    torch_threads: int = 0  # intra-op threads; 0: all cores
    # threads for Milvus writes, image searches and reads for the entry head (a text
    # question is searched on the model thread, in its encoder batch's job)
    store_threads: int = 4

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device {v!r} is not one of auto, cpu, cuda, cuda:N, mps")

    @field_validator("precision")
    @classmethod
    def _check_precision(cls, v: str) -> str:
        from .devices import check_precision

        return check_precision(v)

    @field_validator("threshold")
    @classmethod
    def _check_threshold(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"threshold {v} must be within [0, 1]")
        return v

    @field_validator("max_batch", "max_queue")
    @classmethod
    def _check_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        return v

    def rank_options(self):
        """The ranking settings as rank.RankOptions.

        Raises:
            ValueError: A ranking setting is unusable.
        """
        from .rank import RankOptions

        opts = RankOptions(
            aggregation=self.aggregation, top_rows=self.top_rows, knn=self.knn,
            knn_temperature=self.knn_temperature, fusion=self.fusion,
            lexical_weight=self.lexical_weight, confidence=self.confidence,
            margin_weight=self.margin_weight, head_weight=self.head_weight,
        )
        opts.check()
        return opts

    def threshold_for(self, knowledge_base: str) -> float:
        """Confidence threshold of one knowledge base."""
        return self.thresholds.get(knowledge_base, self.threshold)

