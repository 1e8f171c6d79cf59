"""The answering layer's request and event types: what a question carries and what its
answer stream yields. No gRPC (api/converters.py maps them to protobuf)."""

from __future__ import annotations

from dataclasses import dataclass

from supportqa_server.knowledge.articles import Passage
from supportqa_server.knowledge.entries import EntryData
from supportqa_server.runtime.settings import DEFAULT_KB

MAX_TOP_K = 50
DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class AudioInput:
    data: bytes
    format: str = ""  # "" (sniff) | wav | flac | ogg | mp3 | pcm16
    sample_rate_hz: int = 0
    channels: int = 0


@dataclass(frozen=True)
class ImageInput:
    data: bytes
    mime_type: str = ""


@dataclass(frozen=True)
class AskRequest:
    """One question, validated by `Pipeline.check`."""

    text: str = ""
    audio: AudioInput | None = None
    image: ImageInput | None = None
    knowledge_base: str = DEFAULT_KB
    top_k: int = DEFAULT_TOP_K
    min_score: float | None = None  # None: the knowledge base's threshold
    locale: str = ""
    tags: tuple[str, ...] = ()
    language: str = ""  # spoken-language hint, ISO 639-1
    clarify: bool = True  # False: never a Clarify, the ranked answers alone
    timeout: float | None = None  # seconds left on the caller's deadline


# Events of an answer stream, in the order they are produced.


@dataclass(frozen=True)
class Accepted:
    request_id: str


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    final: bool = True
    confidence: float = 1.0  # the recogniser's, in [0, 1]


@dataclass(frozen=True)
class NotHeard:
    """The audio was not understood well enough to answer: ask the caller to repeat."""

    reason: str
    confidence: float


@dataclass(frozen=True)
class ImageText:
    lines: tuple[tuple[str, float], ...]  # (text, confidence) in reading order


@dataclass(frozen=True)
class Answer:
    rank: int
    entry: EntryData
    score: float
    routes: tuple[str, ...]
    matched_text: str
    passage: Passage | None = None  # of an article or a long answer: the one that matched
    short_answer: str = ""  # the passage's sentence nearest the question


@dataclass(frozen=True)
class NoAnswer:
    reason: str
    best_score: float
    threshold: float


@dataclass
class Timings:
    """Microseconds per stage."""

    decode_us: int = 0
    transcribe_us: int = 0
    read_us: int = 0
    embed_us: int = 0
    search_us: int = 0
    rank_us: int = 0
    total_us: int = 0


@dataclass(frozen=True)
class Done:
    timings: Timings
    turn: int = 0  # the turn it ends, in a whole-call Converse


@dataclass(frozen=True)
class SpeechStarted:
    """The caller began to speak (whole-call Converse)."""

    turn: int
    at_ms: int  # from the call's first audio


@dataclass(frozen=True)
class Clarify:
    """The best answers score too close together to tell apart: the bot should ask."""

    reason: str
    options: tuple[tuple[str, str, float], ...]  # (entry id, title, confidence), best first


Event = (Accepted | Transcript | ImageText | Answer | NoAnswer | Clarify | NotHeard
         | SpeechStarted | Done)


@dataclass(frozen=True)
class ConverseStart:
    """First message of a Converse stream: where to answer and how the audio comes."""

    request: AskRequest  # knowledge_base, top_k, min_score, locale, tags, language
    format: str = "pcm16"
    sample_rate_hz: int = 16000
    channels: int = 1
    end_silence_ms: int = 0  # 0: wait for EndOfUtterance or the end of the stream
    whole_call: bool = False  # a call of many turns, found by the VAD


@dataclass(frozen=True)
class EndOfUtterance:
    """The caller has finished speaking."""


ConverseMessage = ConverseStart | bytes | EndOfUtterance


@dataclass
class UpsertResult:
    written: int = 0
    replaced: int = 0
    rows: int = 0


@dataclass
class Component:
    name: str
    model: str = ""
    device: str = ""
    enabled: bool = True
    detail: str = ""
