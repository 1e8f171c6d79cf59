"""One knowledge base as a store process holds it: the committed entries and their rows."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from supportqa_server.errors import WrongModel
from supportqa_server.knowledge.entries import EntryData, RowHit


@dataclass
class KBState:
    name: str
    committed: dict[str, tuple[int, EntryData]] = field(default_factory=dict)  # by entry id
    ids: dict[str, str] = field(default_factory=dict)  # entry key -> entry id, of committed
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Bumped before and after every change to ``committed``, so a view derived at one
    # revision never mixes states.
    revision: int = 0
    dim: int = 0  # width of its text vectors as created (0: this process's)
    image_dim: int = 0  # the same for its CLIP vectors
    array_tags: bool = False  # tag keys kept as an ARRAY (else "|k1|k2|" text): layout.py
    published: int = 0  # the revision in supportqa_meta that ``committed`` reflects
    # This process's own commits (upserts and deletes) so far: a re-read from Milvus that
    # a commit overlapped may predate it, and must not replace it (store._read_entries).
    writes: int = 0
    # Entry key -> the version this process last committed (-1: deleted), on a shared
    # Milvus, until a poll finds Milvus holding it (store.own_writes_stand) or re-reads.
    unconfirmed: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    # Entry id -> ``writes`` at this process's last commit of it, until a re-read covers it.
    _written: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    # Row key -> (entry id, kind, text), or None for a stale row: filled by searches, valid
    # for one revision (a search's hits are keys; splitting and looking each up was half of
    # the Python time of a search: ~250 hits a question).
    _hit_rows: tuple[int, dict[str, tuple[str, str, str] | None]] = field(
        default_factory=lambda: (-1, {}), repr=False, compare=False
    )

    def wrote(self, entry_ids) -> None:
        """Records a commit of this process's (call it under ``lock``)."""
        self.writes += 1
        for entry_id in entry_ids:
            self._written[entry_id] = self.writes

    def written_since(self, writes: int) -> list[str]:
        """Ids this process committed after its ``writes``-th commit; forgets the older ones
        (a read begun after them has them). Call it under ``lock``."""
        self._written = {i: w for i, w in self._written.items() if w > writes}
        return list(self._written)

    @property
    def rows(self) -> int:
        return sum(len(e.texts()) for _, e in self.committed.values())

    def hit_rows(self) -> dict[str, tuple[str, str, str] | None]:
        """This revision's row cache (a new one after a write)."""
        revision, rows = self._hit_rows
        if revision != self.revision:
            revision, rows = self._hit_rows = (self.revision, {})
        return rows

    @property
    def image_rows(self) -> int:
        return sum(e.see_rows for _, e in self.committed.values())

    def committed_row(self, pk: str) -> tuple[EntryData, int] | None:
        """(entry, row index) of a row key "key.version.index" whose version is committed;
        None for a stale or uncommitted row."""
        key, version, index = pk.split(".")
        entry_id = self.ids.get(key)
        current = None if entry_id is None else self.committed.get(entry_id)
        if current is None or current[0] != int(version):
            return None
        return current[1], int(index)

    def live(self, hits: list[tuple[str, float]]) -> list[RowHit]:
        """Row hits of committed versions, their texts taken from memory (not sent by Milvus)."""
        rows = self.hit_rows()
        out = []
        for pk, score in hits:
            try:
                row = rows[pk]
            except KeyError:
                found = self.committed_row(pk)
                row = rows[pk] = None if found is None else (
                    found[0].id, *found[0].texts()[found[1]]
                )
            if row is not None:
                out.append(RowHit(*row, score))
        return out

    def check_width(self, dim: int, image_dim: int, vectors: str) -> None:
        """Raises WrongModel unless the knowledge base's ``vectors`` ("text" or "image")
        are as wide as this process's model's (dim, image_dim)."""
        have, want, setting = (
            (self.dim, dim, "SUPPORTQA_TEXT_MODEL") if vectors == "text"
            else (self.image_dim, image_dim, "SUPPORTQA_CLIP_MODEL")
        )
        if have and want and have != want:
            raise WrongModel(
                f"knowledge base {self.name!r} was written with {have}-d {vectors} vectors, "
                f"but this server's {vectors} model gives {want}-d: serve it with the model it "
                f"was written with ({setting}), or ingest it again under a new name or into a "
                "fresh SUPPORTQA_DATA_DIR"
            )
