"""Domain errors raised by the pipeline and the store; servicers map them to gRPC status codes."""

from __future__ import annotations


class SupportQAError(Exception):
    """Base of every error the server turns into a gRPC status (see api/status.py: STATUS_OF)."""


class InvalidInput(SupportQAError):
    """The request is malformed: empty question, bad audio or image, value out of range."""


class NotFound(SupportQAError):
    """A knowledge base or entry that does not exist."""


class UnknownKnowledgeBase(NotFound):
    """A knowledge base that does not exist; the message lists those that do, filtered to
    the ones the caller may see."""

    def __init__(self, name: str, existing) -> None:
        self.name, self.existing = name, sorted(existing)
        super().__init__(self.message())

    def message(self, visible=lambda name: True) -> str:
        names = ", ".join(n for n in self.existing if visible(n)) or "none"
        return (f"knowledge base {self.name!r} does not exist; existing: {names}. Ingest "
                "entries into it first")


class TooLarge(SupportQAError):
    """Input over a documented size limit (text length, audio seconds, image pixels)."""


class Overloaded(SupportQAError):
    """A model's queue is full or would make the caller wait too long, or a memory budget is
    spent; the caller should back off and retry."""


class NotAvailable(SupportQAError):
    """A route the server does not offer (voice or image models not loaded)."""


class Unauthenticated(SupportQAError):
    """Missing or wrong API key."""


class PermissionDenied(SupportQAError):
    """A valid key used outside its role or its knowledge bases."""


class Cancelled(SupportQAError):
    """The caller went away or its deadline passed before the work ran."""


class WrongModel(SupportQAError):
    """A knowledge base written with another text or CLIP model: its vectors have another
    width."""


class NotReady(SupportQAError):
    """The server is still loading models or opening the store."""


class StoreUnavailable(NotReady):
    """Milvus cannot be reached (or has just come back and is loading); retry shortly."""


class DataDirInUse(SupportQAError):
    """Another process holds the data folder's lock."""
