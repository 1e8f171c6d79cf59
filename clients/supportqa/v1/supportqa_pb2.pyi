import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_FORMAT_UNSPECIFIED: _ClassVar[AudioFormat]
    AUDIO_FORMAT_WAV: _ClassVar[AudioFormat]
    AUDIO_FORMAT_FLAC: _ClassVar[AudioFormat]
    AUDIO_FORMAT_OGG: _ClassVar[AudioFormat]
    AUDIO_FORMAT_MP3: _ClassVar[AudioFormat]
    AUDIO_FORMAT_PCM16: _ClassVar[AudioFormat]
    AUDIO_FORMAT_MULAW: _ClassVar[AudioFormat]
    AUDIO_FORMAT_ALAW: _ClassVar[AudioFormat]

class Route(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_UNSPECIFIED: _ClassVar[Route]
    ROUTE_DENSE: _ClassVar[Route]
    ROUTE_LEXICAL: _ClassVar[Route]
    ROUTE_READ: _ClassVar[Route]
    ROUTE_SEE: _ClassVar[Route]

class BodyFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BODY_FORMAT_UNSPECIFIED: _ClassVar[BodyFormat]
    BODY_FORMAT_MARKDOWN: _ClassVar[BodyFormat]
    BODY_FORMAT_HTML: _ClassVar[BodyFormat]
    BODY_FORMAT_TEXT: _ClassVar[BodyFormat]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_HELPFUL: _ClassVar[Verdict]
    VERDICT_NOT_HELPFUL: _ClassVar[Verdict]

class SuggestionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUGGESTION_KIND_UNSPECIFIED: _ClassVar[SuggestionKind]
    SUGGESTION_KIND_PARAPHRASES: _ClassVar[SuggestionKind]
    SUGGESTION_KIND_NEW_ENTRY: _ClassVar[SuggestionKind]
AUDIO_FORMAT_UNSPECIFIED: AudioFormat
AUDIO_FORMAT_WAV: AudioFormat
AUDIO_FORMAT_FLAC: AudioFormat
AUDIO_FORMAT_OGG: AudioFormat
AUDIO_FORMAT_MP3: AudioFormat
AUDIO_FORMAT_PCM16: AudioFormat
AUDIO_FORMAT_MULAW: AudioFormat
AUDIO_FORMAT_ALAW: AudioFormat
ROUTE_UNSPECIFIED: Route
ROUTE_DENSE: Route
ROUTE_LEXICAL: Route
ROUTE_READ: Route
ROUTE_SEE: Route
BODY_FORMAT_UNSPECIFIED: BodyFormat
BODY_FORMAT_MARKDOWN: BodyFormat
BODY_FORMAT_HTML: BodyFormat
BODY_FORMAT_TEXT: BodyFormat
VERDICT_UNSPECIFIED: Verdict
VERDICT_HELPFUL: Verdict
VERDICT_NOT_HELPFUL: Verdict
SUGGESTION_KIND_UNSPECIFIED: SuggestionKind
SUGGESTION_KIND_PARAPHRASES: SuggestionKind
SUGGESTION_KIND_NEW_ENTRY: SuggestionKind

class Audio(_message.Message):
    __slots__ = ("data", "format", "sample_rate_hz", "channels")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    format: AudioFormat
    sample_rate_hz: int
    channels: int
    def __init__(self, data: _Optional[bytes] = ..., format: _Optional[_Union[AudioFormat, str]] = ..., sample_rate_hz: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "mime_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ...) -> None: ...

class Question(_message.Message):
    __slots__ = ("knowledge_base", "text", "audio", "image", "top_k", "min_score", "locale", "tags", "metadata", "language", "no_clarify")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    LOCALE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    NO_CLARIFY_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    text: str
    audio: Audio
    image: Image
    top_k: int
    min_score: float
    locale: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.ScalarMap[str, str]
    language: str
    no_clarify: bool
    def __init__(self, knowledge_base: _Optional[str] = ..., text: _Optional[str] = ..., audio: _Optional[_Union[Audio, _Mapping]] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., top_k: _Optional[int] = ..., min_score: _Optional[float] = ..., locale: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., language: _Optional[str] = ..., no_clarify: _Optional[bool] = ...) -> None: ...

class Answer(_message.Message):
    __slots__ = ("rank", "entry_id", "title", "answer", "score", "routes", "matched_text", "url", "tags", "passage", "short_answer")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    MATCHED_TEXT_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_FIELD_NUMBER: _ClassVar[int]
    SHORT_ANSWER_FIELD_NUMBER: _ClassVar[int]
    rank: int
    entry_id: str
    title: str
    answer: str
    score: float
    routes: _containers.RepeatedScalarFieldContainer[Route]
    matched_text: str
    url: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    passage: Passage
    short_answer: str
    def __init__(self, rank: _Optional[int] = ..., entry_id: _Optional[str] = ..., title: _Optional[str] = ..., answer: _Optional[str] = ..., score: _Optional[float] = ..., routes: _Optional[_Iterable[_Union[Route, str]]] = ..., matched_text: _Optional[str] = ..., url: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., passage: _Optional[_Union[Passage, _Mapping]] = ..., short_answer: _Optional[str] = ...) -> None: ...

class Passage(_message.Message):
    __slots__ = ("text", "headings", "start", "end")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    HEADINGS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    text: str
    headings: _containers.RepeatedScalarFieldContainer[str]
    start: int
    end: int
    def __init__(self, text: _Optional[str] = ..., headings: _Optional[_Iterable[str]] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class NoAnswer(_message.Message):
    __slots__ = ("reason", "best_score", "threshold")
    REASON_FIELD_NUMBER: _ClassVar[int]
    BEST_SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    reason: str
    best_score: float
    threshold: float
    def __init__(self, reason: _Optional[str] = ..., best_score: _Optional[float] = ..., threshold: _Optional[float] = ...) -> None: ...

class Clarify(_message.Message):
    __slots__ = ("reason", "options")
    REASON_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    options: _containers.RepeatedCompositeFieldContainer[ClarifyOption]
    def __init__(self, reason: _Optional[str] = ..., options: _Optional[_Iterable[_Union[ClarifyOption, _Mapping]]] = ...) -> None: ...

class ClarifyOption(_message.Message):
    __slots__ = ("entry_id", "title", "score")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    title: str
    score: float
    def __init__(self, entry_id: _Optional[str] = ..., title: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class Transcript(_message.Message):
    __slots__ = ("text", "language", "final", "confidence")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    text: str
    language: str
    final: bool
    confidence: float
    def __init__(self, text: _Optional[str] = ..., language: _Optional[str] = ..., final: _Optional[bool] = ..., confidence: _Optional[float] = ...) -> None: ...

class NotHeard(_message.Message):
    __slots__ = ("reason", "confidence")
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    confidence: float
    def __init__(self, reason: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class TextLine(_message.Message):
    __slots__ = ("text", "confidence")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    text: str
    confidence: float
    def __init__(self, text: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class ImageText(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[TextLine]
    def __init__(self, lines: _Optional[_Iterable[_Union[TextLine, _Mapping]]] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("decode_us", "transcribe_us", "read_us", "embed_us", "search_us", "rank_us", "total_us")
    DECODE_US_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIBE_US_FIELD_NUMBER: _ClassVar[int]
    READ_US_FIELD_NUMBER: _ClassVar[int]
    EMBED_US_FIELD_NUMBER: _ClassVar[int]
    SEARCH_US_FIELD_NUMBER: _ClassVar[int]
    RANK_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    decode_us: int
    transcribe_us: int
    read_us: int
    embed_us: int
    search_us: int
    rank_us: int
    total_us: int
    def __init__(self, decode_us: _Optional[int] = ..., transcribe_us: _Optional[int] = ..., read_us: _Optional[int] = ..., embed_us: _Optional[int] = ..., search_us: _Optional[int] = ..., rank_us: _Optional[int] = ..., total_us: _Optional[int] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("timings", "turn")
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    timings: StageTimings
    turn: int
    def __init__(self, timings: _Optional[_Union[StageTimings, _Mapping]] = ..., turn: _Optional[int] = ...) -> None: ...

class SpeechStarted(_message.Message):
    __slots__ = ("turn", "at_ms")
    TURN_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    turn: int
    at_ms: int
    def __init__(self, turn: _Optional[int] = ..., at_ms: _Optional[int] = ...) -> None: ...

class AnswerEvent(_message.Message):
    __slots__ = ("accepted", "transcript", "image_text", "answer", "no_answer", "done", "clarify", "speech_started", "not_heard")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TEXT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    NO_ANSWER_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    CLARIFY_FIELD_NUMBER: _ClassVar[int]
    SPEECH_STARTED_FIELD_NUMBER: _ClassVar[int]
    NOT_HEARD_FIELD_NUMBER: _ClassVar[int]
    accepted: Accepted
    transcript: Transcript
    image_text: ImageText
    answer: Answer
    no_answer: NoAnswer
    done: Done
    clarify: Clarify
    speech_started: SpeechStarted
    not_heard: NotHeard
    def __init__(self, accepted: _Optional[_Union[Accepted, _Mapping]] = ..., transcript: _Optional[_Union[Transcript, _Mapping]] = ..., image_text: _Optional[_Union[ImageText, _Mapping]] = ..., answer: _Optional[_Union[Answer, _Mapping]] = ..., no_answer: _Optional[_Union[NoAnswer, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ..., clarify: _Optional[_Union[Clarify, _Mapping]] = ..., speech_started: _Optional[_Union[SpeechStarted, _Mapping]] = ..., not_heard: _Optional[_Union[NotHeard, _Mapping]] = ...) -> None: ...

class AnswerSet(_message.Message):
    __slots__ = ("request_id", "answers", "no_answer", "transcript", "image_text", "timings", "clarify", "not_heard")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    NO_ANSWER_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TEXT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    CLARIFY_FIELD_NUMBER: _ClassVar[int]
    NOT_HEARD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    answers: _containers.RepeatedCompositeFieldContainer[Answer]
    no_answer: NoAnswer
    transcript: Transcript
    image_text: ImageText
    timings: StageTimings
    clarify: Clarify
    not_heard: NotHeard
    def __init__(self, request_id: _Optional[str] = ..., answers: _Optional[_Iterable[_Union[Answer, _Mapping]]] = ..., no_answer: _Optional[_Union[NoAnswer, _Mapping]] = ..., transcript: _Optional[_Union[Transcript, _Mapping]] = ..., image_text: _Optional[_Union[ImageText, _Mapping]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., clarify: _Optional[_Union[Clarify, _Mapping]] = ..., not_heard: _Optional[_Union[NotHeard, _Mapping]] = ...) -> None: ...

class ConverseConfig(_message.Message):
    __slots__ = ("question", "format", "sample_rate_hz", "channels", "end_silence_ms", "whole_call")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    END_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    WHOLE_CALL_FIELD_NUMBER: _ClassVar[int]
    question: Question
    format: AudioFormat
    sample_rate_hz: int
    channels: int
    end_silence_ms: int
    whole_call: bool
    def __init__(self, question: _Optional[_Union[Question, _Mapping]] = ..., format: _Optional[_Union[AudioFormat, str]] = ..., sample_rate_hz: _Optional[int] = ..., channels: _Optional[int] = ..., end_silence_ms: _Optional[int] = ..., whole_call: _Optional[bool] = ...) -> None: ...

class EndOfUtterance(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConverseRequest(_message.Message):
    __slots__ = ("config", "audio_chunk", "end")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    config: ConverseConfig
    audio_chunk: bytes
    end: EndOfUtterance
    def __init__(self, config: _Optional[_Union[ConverseConfig, _Mapping]] = ..., audio_chunk: _Optional[bytes] = ..., end: _Optional[_Union[EndOfUtterance, _Mapping]] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("knowledge_base", "id", "title", "answer", "questions", "tags", "locale", "images", "url", "updated_at", "body", "body_format")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    LOCALE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    BODY_FORMAT_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    id: str
    title: str
    answer: str
    questions: _containers.RepeatedScalarFieldContainer[str]
    tags: _containers.RepeatedScalarFieldContainer[str]
    locale: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    url: str
    updated_at: _timestamp_pb2.Timestamp
    body: str
    body_format: BodyFormat
    def __init__(self, knowledge_base: _Optional[str] = ..., id: _Optional[str] = ..., title: _Optional[str] = ..., answer: _Optional[str] = ..., questions: _Optional[_Iterable[str]] = ..., tags: _Optional[_Iterable[str]] = ..., locale: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., url: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., body: _Optional[str] = ..., body_format: _Optional[_Union[BodyFormat, str]] = ...) -> None: ...

class EntryFailure(_message.Message):
    __slots__ = ("index", "entry_id", "code", "message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    entry_id: str
    code: str
    message: str
    def __init__(self, index: _Optional[int] = ..., entry_id: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class UpsertSummary(_message.Message):
    __slots__ = ("received", "written", "replaced", "rows", "failures")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    received: int
    written: int
    replaced: int
    rows: int
    failures: _containers.RepeatedCompositeFieldContainer[EntryFailure]
    def __init__(self, received: _Optional[int] = ..., written: _Optional[int] = ..., replaced: _Optional[int] = ..., rows: _Optional[int] = ..., failures: _Optional[_Iterable[_Union[EntryFailure, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("knowledge_base", "ids")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, knowledge_base: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteSummary(_message.Message):
    __slots__ = ("deleted", "not_found")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("knowledge_base", "id")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    id: str
    def __init__(self, knowledge_base: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class ListIdsRequest(_message.Message):
    __slots__ = ("knowledge_base",)
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    def __init__(self, knowledge_base: _Optional[str] = ...) -> None: ...

class ListIdsReply(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("knowledge_base",)
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    def __init__(self, knowledge_base: _Optional[str] = ...) -> None: ...

class KnowledgeBaseStats(_message.Message):
    __slots__ = ("name", "entries", "rows", "image_rows", "threshold", "head", "threshold_source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ROWS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    entries: int
    rows: int
    image_rows: int
    threshold: float
    head: str
    threshold_source: str
    def __init__(self, name: _Optional[str] = ..., entries: _Optional[int] = ..., rows: _Optional[int] = ..., image_rows: _Optional[int] = ..., threshold: _Optional[float] = ..., head: _Optional[str] = ..., threshold_source: _Optional[str] = ...) -> None: ...

class Component(_message.Message):
    __slots__ = ("name", "model", "device", "enabled", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    device: str
    enabled: bool
    detail: str
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., enabled: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("knowledge_bases", "components")
    KNOWLEDGE_BASES_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    knowledge_bases: _containers.RepeatedCompositeFieldContainer[KnowledgeBaseStats]
    components: _containers.RepeatedCompositeFieldContainer[Component]
    def __init__(self, knowledge_bases: _Optional[_Iterable[_Union[KnowledgeBaseStats, _Mapping]]] = ..., components: _Optional[_Iterable[_Union[Component, _Mapping]]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("request_id", "verdict", "entry_id", "comment", "knowledge_base")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    verdict: Verdict
    entry_id: str
    comment: str
    knowledge_base: str
    def __init__(self, request_id: _Optional[str] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., entry_id: _Optional[str] = ..., comment: _Optional[str] = ..., knowledge_base: _Optional[str] = ...) -> None: ...

class FeedbackReply(_message.Message):
    __slots__ = ("knowledge_base", "outcome")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    outcome: str
    def __init__(self, knowledge_base: _Optional[str] = ..., outcome: _Optional[str] = ...) -> None: ...

class SuggestRequest(_message.Message):
    __slots__ = ("knowledge_base", "min_questions", "max_suggestions")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    MIN_QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SUGGESTIONS_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    min_questions: int
    max_suggestions: int
    def __init__(self, knowledge_base: _Optional[str] = ..., min_questions: _Optional[int] = ..., max_suggestions: _Optional[int] = ...) -> None: ...

class Suggestion(_message.Message):
    __slots__ = ("id", "kind", "entry_id", "questions", "asked", "score", "reason", "nearest_entry_id", "blocked", "request_ids")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    ASKED_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NEAREST_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: SuggestionKind
    entry_id: str
    questions: _containers.RepeatedScalarFieldContainer[str]
    asked: int
    score: float
    reason: str
    nearest_entry_id: str
    blocked: str
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[SuggestionKind, str]] = ..., entry_id: _Optional[str] = ..., questions: _Optional[_Iterable[str]] = ..., asked: _Optional[int] = ..., score: _Optional[float] = ..., reason: _Optional[str] = ..., nearest_entry_id: _Optional[str] = ..., blocked: _Optional[str] = ..., request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SuggestReply(_message.Message):
    __slots__ = ("suggestions",)
    SUGGESTIONS_FIELD_NUMBER: _ClassVar[int]
    suggestions: _containers.RepeatedCompositeFieldContainer[Suggestion]
    def __init__(self, suggestions: _Optional[_Iterable[_Union[Suggestion, _Mapping]]] = ...) -> None: ...

class LintRequest(_message.Message):
    __slots__ = ("knowledge_base",)
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    def __init__(self, knowledge_base: _Optional[str] = ...) -> None: ...

class ConfusablePair(_message.Message):
    __slots__ = ("entry_id_a", "entry_id_b", "similarity", "text_a", "text_b", "text_similarity")
    ENTRY_ID_A_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_B_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    TEXT_A_FIELD_NUMBER: _ClassVar[int]
    TEXT_B_FIELD_NUMBER: _ClassVar[int]
    TEXT_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    entry_id_a: str
    entry_id_b: str
    similarity: float
    text_a: str
    text_b: str
    text_similarity: float
    def __init__(self, entry_id_a: _Optional[str] = ..., entry_id_b: _Optional[str] = ..., similarity: _Optional[float] = ..., text_a: _Optional[str] = ..., text_b: _Optional[str] = ..., text_similarity: _Optional[float] = ...) -> None: ...

class MisplacedParaphrase(_message.Message):
    __slots__ = ("entry_id", "paraphrase", "own_score", "other_entry_id", "other_score")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    PARAPHRASE_FIELD_NUMBER: _ClassVar[int]
    OWN_SCORE_FIELD_NUMBER: _ClassVar[int]
    OTHER_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    OTHER_SCORE_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    paraphrase: str
    own_score: float
    other_entry_id: str
    other_score: float
    def __init__(self, entry_id: _Optional[str] = ..., paraphrase: _Optional[str] = ..., own_score: _Optional[float] = ..., other_entry_id: _Optional[str] = ..., other_score: _Optional[float] = ...) -> None: ...

class LintReply(_message.Message):
    __slots__ = ("entries", "rows", "confusable", "misplaced")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CONFUSABLE_FIELD_NUMBER: _ClassVar[int]
    MISPLACED_FIELD_NUMBER: _ClassVar[int]
    entries: int
    rows: int
    confusable: _containers.RepeatedCompositeFieldContainer[ConfusablePair]
    misplaced: _containers.RepeatedCompositeFieldContainer[MisplacedParaphrase]
    def __init__(self, entries: _Optional[int] = ..., rows: _Optional[int] = ..., confusable: _Optional[_Iterable[_Union[ConfusablePair, _Mapping]]] = ..., misplaced: _Optional[_Iterable[_Union[MisplacedParaphrase, _Mapping]]] = ...) -> None: ...

class DeleteQuestionsRequest(_message.Message):
    __slots__ = ("conversation_id", "knowledge_base")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    knowledge_base: str
    def __init__(self, conversation_id: _Optional[str] = ..., knowledge_base: _Optional[str] = ...) -> None: ...

class DeleteQuestionsReply(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...
