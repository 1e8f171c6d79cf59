"""What answering derives from each knowledge base's entries (its entry head, its speech
language model, its calibrated threshold), in one object per knowledge base, rebuilt when the
store's revision of that knowledge base moves. head.py holds the classifier itself,
calibration.py the threshold's measurement."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass

import numpy as np

from supportqa_server.answering.calibration import Calibration, Calibrator, out_of_scope_pool
from supportqa_server.answering.head import EntryHead, HeadTrainer, word_rows
from supportqa_server.errors import SupportQAError

log = logging.getLogger(__name__)

# An ingest is many Upsert calls: the entry head trains once writes pause this long (s)
# rather than after each one.
HEAD_SETTLE_S = 1.0
LM_REBUILD_S = 10.0  # speech LM of a changing knowledge base: rebuilt at most this often (s)
# The head's full-batch fit holds a rows x entries matrix of logits (float32), and as many
# probabilities and gradients: past 1e8 (400 MB each) a fit takes gigabytes and minutes an
# iteration on 2 cores. CLINC150's 15,000 rows x 150 entries are 2.3e6.
HEAD_MAX_LOGITS = 100_000_000


def head_off(got: tuple | None, max_rows: int) -> str | None:
    """Why a knowledge base goes without an entry head (None: it gets one). got: what
    store.text_vectors returned (None: more than max_rows rows)."""
    if got is None:
        return f"more than SUPPORTQA_HEAD_MAX_ROWS={max_rows} rows"
    rows, entries = len(got[1]), len(set(got[1]))
    if entries < 2:
        return "fewer than 2 entries"
    if rows * entries > HEAD_MAX_LOGITS:
        return (f"{rows} rows x {entries} entries: its fit would hold "
                f"{rows * entries * 4 / 1e9:.1f} GB of logits, over {HEAD_MAX_LOGITS:.0e}")
    return None


@dataclass
class KnowledgeBaseState:
    """One knowledge base's derived models, each tagged with the store revision it was made
    from: a model behind the store is stale and is rebuilt."""

    name: str
    head: EntryHead | None = None  # may be behind the entries; head.revision says
    head_task: asyncio.Task | None = None  # the training under way
    head_off_at: int | None = None  # a revision at which no head can be trained
    speech_lm: object = None  # KnowledgeLM
    speech_lm_revision: int = -1
    speech_lm_built: float = float("-inf")  # time.monotonic() s
    calibration: Calibration | None = None  # the latest, possibly of an older revision
    calibration_off_at: int | None = None  # a revision too small to calibrate
    # Writes of this process under way (embedding or committing): the head waits for them,
    # since a bulk ingest commits a batch every few seconds and each fit in between is stale.
    writing: int = 0


class KnowledgeBases:
    """The one owner of every knowledge base's KnowledgeBaseState.

    Args:
        settings: pinned_threshold, calibrate, fallback_threshold, head_max_rows,
            head_words, head_c.
        head_on: Whether any ranking uses an entry head (a weight above 0).
        rank_options: The ranking of typed questions, which calibration replays.
        model_exec: The model thread (all torch work runs there).
        store_exec: Threads for reading the rows.
    """

    def __init__(self, settings, *, head_on: bool, model_exec, store_exec,
                 rank_options=None) -> None:
        self.settings = settings
        self.head_on = head_on
        self.rank_options = rank_options
        # Embeds texts on the model thread (Models.encode_batch), once the models are loaded;
        # calibration needs it for the out-of-scope pool.
        self.encode = None
        self._pool: tuple[list[str], object] | None = None
        self.store = None  # KnowledgeStore, once open
        self.speech = None  # SpeechRecognizer, when voice is on
        self._model_exec, self._store_exec = model_exec, store_exec
        self._states: dict[str, KnowledgeBaseState] = {}

    def state(self, kb: str) -> KnowledgeBaseState:
        if kb not in self._states:
            self._states[kb] = KnowledgeBaseState(kb)
        return self._states[kb]

    def threshold(self, kb: str) -> float:
        """The score below which the knowledge base's best match is no answer: pinned by the
        operator, else calibrated (for the confidence with the head while the head is
        current, for the cosine alone while it retrains), else the fallback."""
        pinned = self.settings.pinned_threshold(kb)
        if pinned is not None:
            return pinned[0]
        st = self._states.get(kb)
        cal = st.calibration if st is not None else None
        if cal is None:
            return self.settings.fallback_threshold
        head = st.head
        current = head is not None and self.store is not None and (
            head.revision == self.store.revision(kb))
        return cal.threshold if current else cal.threshold_cosine

    def threshold_source(self, kb: str) -> str:
        """How threshold(kb) was set, for Stats."""
        pinned = self.settings.pinned_threshold(kb)
        if pinned is not None:
            return f"pinned ({pinned[1]})"
        st = self._states.get(kb)
        if not self.settings.calibrate:
            return "default (SUPPORTQA_FALLBACK_THRESHOLD; SUPPORTQA_CALIBRATE is off)"
        if st is not None and st.calibration is not None:
            behind = self.store is not None and st.calibration.revision != self.store.revision(kb)
            return st.calibration.describe() + (
                ("; re-measuring after writes" if self.calibrating(kb)
                 else "; of earlier entries") if behind else "")
        if st is not None and st.calibration_off_at is not None:
            return ("default (SUPPORTQA_FALLBACK_THRESHOLD): too few paraphrases to "
                    "calibrate")
        if not self.head_on or (st is not None and self.store is not None
                                and st.head_off_at == self.store.revision(kb)):
            return "default (SUPPORTQA_FALLBACK_THRESHOLD): calibration needs the entry head"
        return "default (SUPPORTQA_FALLBACK_THRESHOLD) while calibrating"

    def calibrating(self, kb: str) -> bool:
        """Whether a calibration of the knowledge base's current entries is still to come."""
        if (self.settings.pinned_threshold(kb) is not None or not self.settings.calibrate
                or not self.head_on or self.store is None or not self.store.has(kb)):
            return False
        st, revision = self.state(kb), self.store.revision(kb)
        done = (st.calibration is not None and st.calibration.revision == revision) or (
            st.calibration_off_at == revision or st.head_off_at == revision)
        return not done

    def head(self, kb: str) -> EntryHead | None:
        """The knowledge base's entry head when it was trained on the current entries; else
        None, and a training is started (a stale head would favour the entries it knew)."""
        if not self.head_on or self.store is None or not self.store.has(kb):
            return None
        revision = self.store.revision(kb)
        st = self.state(kb)
        if st.head is not None and st.head.revision == revision:
            return st.head
        if st.head_off_at != revision and (st.head_task is None or st.head_task.done()):
            st.head_task = asyncio.get_running_loop().create_task(self._train(st))
        return None

    @contextlib.contextmanager
    def writing(self, kb: str):
        """Marks a write of kb under way: its head and calibration wait until it ends."""
        st = self.state(kb)
        st.writing += 1
        try:
            yield
        finally:
            st.writing -= 1

    def head_state(self, kb: str) -> str:
        """"ready" (trained on the current entries), "training" or "off"."""
        if self.head(kb) is not None:
            return "ready"
        off = not self.head_on or (
            self.store is not None and self.state(kb).head_off_at == self.store.revision(kb)
        )
        return "off" if off else "training"

    def speech_lm(self, kb: str):
        """The knowledge base's language model for Whisper's decoding, None when off.

        Runs on the model thread only. Built on a KB's first voice question (~1 s per 10k
        texts) and rebuilt after writes, at most once per LM_REBUILD_S: a model a few writes
        behind still knows the domain's words.
        """
        speech, store = self.speech, self.store
        if speech is None or store is None or speech.lm_weight <= 0 or not store.has(kb):
            return None
        st = self.state(kb)
        now = time.monotonic()
        if st.speech_lm is not None and (
            st.speech_lm_revision == store.revision(kb) or now - st.speech_lm_built < LM_REBUILD_S
        ):
            return st.speech_lm
        t0 = time.perf_counter()
        revision, texts = store.texts(kb)
        st.speech_lm = speech.knowledge_lm(texts)
        st.speech_lm_revision, st.speech_lm_built = revision, now
        log.info("speech language model for %r: %d texts in %.2f s", kb, st.speech_lm.n_texts,
                 time.perf_counter() - t0)
        return st.speech_lm

    def cancel(self) -> None:
        for st in self._states.values():
            if st.head_task is not None:
                st.head_task.cancel()

    async def _train(self, st: KnowledgeBaseState) -> None:
        """Trains the head until one matches the knowledge base's revision. Each step of the
        fit is its own task on the model thread, so questions keep being embedded."""
        assert self.store is not None
        store, s, loop, kb = self.store, self.settings, asyncio.get_running_loop(), st.name
        while True:
            revision = store.revision(kb)
            if st.head is not None and st.head.revision == revision:
                return
            await asyncio.sleep(HEAD_SETTLE_S)
            if store.revision(kb) != revision or st.writing:
                continue  # still being written
            t0 = time.perf_counter()
            trainer = None
            try:
                got = await loop.run_in_executor(
                    self._store_exec, store.text_vectors, kb, s.head_max_rows
                )
                if (why := head_off(got, s.head_max_rows)) is not None:
                    log.info("entry head for %r: off (%s)", kb, why)
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
                        if not await self._still_current(st, revision):
                            break  # the fit is stale: a new one follows the write
                    if store.revision(kb) != revision:
                        continue
            except SupportQAError as e:  # e.g. written with another model: its message says
                log.warning("entry head for %r: off (%s)", kb, e)
                trainer = None
            except Exception:  # noqa: BLE001 - answers go on without a head; the log says why
                log.exception("entry head for %r: training failed", kb)
                trainer = None
            if trainer is None:
                st.head_off_at = revision
                return
            st.head = trainer.head()
            log.info("entry head for %r: %d rows, %d entries, %d iterations in %.1f s", kb,
                     len(got[1]), len(trainer.entry_ids), trainer.iterations,
                     time.perf_counter() - t0)
            if self.settings.calibrate and self.settings.pinned_threshold(kb) is None:
                await self._calibrate(st, got)

    async def _still_current(self, st: KnowledgeBaseState, revision: int) -> bool:
        """Between two steps of a fit: while a write of the knowledge base is under way the
        fit gives the model thread to it (a bulk ingest's embedding), then goes on if the
        write changed nothing."""
        while st.writing:
            await asyncio.sleep(HEAD_SETTLE_S)
        return self.store.revision(st.name) == revision

    async def _calibrate(self, st: KnowledgeBaseState, got: tuple) -> None:
        """Measures the knowledge base's threshold on the rows the head was trained on
        (calibration.py); its steps run on the model thread, as the head's do."""
        loop, s = asyncio.get_running_loop(), self.settings
        if self.encode is None or self.rank_options is None:
            return
        t0 = time.perf_counter()
        try:
            if self._pool is None:
                texts = out_of_scope_pool()
                vectors = await loop.run_in_executor(self._model_exec, self.encode, texts)
                self._pool = (texts, np.stack(vectors))
            cal = await loop.run_in_executor(self._model_exec, functools.partial(
                Calibrator, *got, pool=self._pool, opts=self.rank_options,
                head_kwargs={"c": s.head_c}, words_for=word_rows if s.head_words else None))
            while not await loop.run_in_executor(self._model_exec, cal.step):
                if not await self._still_current(st, got[0]):
                    return  # measured again after the write, with the head that follows it
            result = await loop.run_in_executor(self._model_exec, cal.result)
        except Exception:  # noqa: BLE001 - the fallback threshold applies; the log says why
            log.exception("threshold of %r: calibration failed", st.name)
            return
        if result is None:
            st.calibration_off_at = got[0]
            log.info("threshold of %r: fallback %.2f (too few paraphrases to calibrate)",
                     st.name, s.fallback_threshold)
            return
        st.calibration = result
        log.info("threshold of %r: %.3f (%.3f without the head), %s, in %.1f s", st.name,
                 result.threshold, result.threshold_cosine, result.describe(),
                 time.perf_counter() - t0)
