"""Per knowledge base, the entry head that matches its current entries, trained in the
background after writes (head.py holds the classifier itself)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from supportqa_server.answering.head import EntryHead, HeadTrainer, word_rows
from supportqa_server.errors import SupportQAError

log = logging.getLogger(__name__)

# An ingest is many Upsert calls: the entry head trains once writes pause this long (s)
# rather than after each one.
HEAD_SETTLE_S = 1.0


class HeadKeeper:
    """Knows each knowledge base's entry head, and trains a new one when its entries change.

    Args:
        settings: head_max_rows, head_words, head_c.
        on: Whether any ranking uses a head (a weight above 0).
        model_exec: The model thread (all torch work runs there).
        store_exec: Threads for reading the rows.
    """

    def __init__(self, settings, *, on: bool, model_exec, store_exec) -> None:
        self.settings = settings
        self.on = on
        self.store = None  # KnowledgeStore, once open
        self._model_exec, self._store_exec = model_exec, store_exec
        self.heads: dict[str, EntryHead] = {}  # per knowledge base, maybe behind its writes
        self._tasks: dict[str, asyncio.Task] = {}
        self._off: dict[str, int] = {}  # knowledge base -> revision it cannot have one at

    def head(self, kb: str) -> EntryHead | None:
        """The knowledge base's entry head when it was trained on the current entries; else
        None, and a training is started (a stale head would favour the entries it knew)."""
        if not self.on or self.store is None or not self.store.has(kb):
            return None
        revision = self.store.revision(kb)
        head = self.heads.get(kb)
        if head is not None and head.revision == revision:
            return head
        task = self._tasks.get(kb)
        if self._off.get(kb) != revision and (task is None or task.done()):
            self._tasks[kb] = asyncio.get_running_loop().create_task(self._keep(kb))
        return None

    def state(self, kb: str) -> str:
        """"ready" (trained on the current entries), "training" or "off"."""
        if self.head(kb) is not None:
            return "ready"
        off = not self.on or (
            self.store is not None and self._off.get(kb) == self.store.revision(kb)
        )
        return "off" if off else "training"

    def cancel(self) -> None:
        for task in self._tasks.values():
            task.cancel()

    async def _keep(self, kb: str) -> None:
        """Trains the head until one matches the knowledge base's revision. Each step of the
        fit is its own task on the model thread, so questions keep being embedded."""
        assert self.store is not None
        store, s, loop = self.store, self.settings, asyncio.get_running_loop()
        while True:
            revision = store.revision(kb)
            head = self.heads.get(kb)
            if head is not None and head.revision == revision:
                return
            await asyncio.sleep(HEAD_SETTLE_S)
            if store.revision(kb) != revision:
                continue  # still being written
            t0 = time.perf_counter()
            trainer = None
            try:
                got = await loop.run_in_executor(
                    self._store_exec, store.text_vectors, kb, s.head_max_rows
                )
                if got is None or len(set(got[1])) < 2:
                    log.info("entry head for %r: off (%s)", kb, "fewer than 2 entries" if got
                             else f"more than SUPPORTQA_HEAD_MAX_ROWS={s.head_max_rows} rows")
                else:
                    words = await loop.run_in_executor(
                        self._store_exec, word_rows, got[3], len(set(got[1]))
                    ) if s.head_words else None
                    # The head's tensors are made on the model thread, as all torch work is: a
                    # parallel torch op on another thread starts a second OpenMP team, and with
                    # more OpenMP threads than cores libgomp stops spinning between regions, so
                    # every encode after ran ~2x slower (one sentence: 8 -> 15 ms).
                    trainer = await loop.run_in_executor(self._model_exec, functools.partial(
                        HeadTrainer, got[2], got[1], c=s.head_c, revision=got[0], words=words))
                    while not await loop.run_in_executor(self._model_exec, trainer.step):
                        pass
            except SupportQAError as e:  # e.g. written with another model: its message says
                log.warning("entry head for %r: off (%s)", kb, e)
                trainer = None
            except Exception:  # noqa: BLE001 - answers go on without a head; the log says why
                log.exception("entry head for %r: training failed", kb)
                trainer = None
            if trainer is None:
                self._off[kb] = revision
                return
            self.heads[kb] = trainer.head()
            log.info("entry head for %r: %d rows, %d entries, %d iterations in %.1f s", kb,
                     len(got[1]), len(trainer.entry_ids), trainer.iterations,
                     time.perf_counter() - t0)
