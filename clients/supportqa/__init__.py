"""supportqa client library: ask questions and manage knowledge bases over gRPC."""

from .client import (
    TLS,
    AsyncSupportClient,
    SupportClient,
    SupportQAError,
    event_of,
    question,
)
from .knowledge_file import KnowledgeFileError, read_entries
from .v1 import supportqa_pb2 as pb

__all__ = [
    "TLS",
    "AsyncSupportClient",
    "KnowledgeFileError",
    "SupportClient",
    "SupportQAError",
    "event_of",
    "pb",
    "question",
    "read_entries",
]
