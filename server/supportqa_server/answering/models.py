"""The models a question may need, loaded once, each run on its thread behind a batcher."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from supportqa_server.answering.types import Component, ImageInput
from supportqa_server.errors import InvalidInput, TooLarge
from supportqa_server.runtime.batching import MicroBatcher
from supportqa_server.runtime.settings import Settings

log = logging.getLogger(__name__)

# Questions per encoder forward pass within one batch, on CPU, by precision, as "auto" times
# the runtimes (the server's own passes are cut by a token budget tuned on the CPU:
# text_runtime.tuned_token_budget). 2 cores, BANKING77 questions, batch of 64: float32 355/s
# at 16 (216/s at 64); bfloat16 712/s at 32, 700/s at 16, 645/s at 64; onnxruntime int8
# (AVX2): 217/s at 8, 191/s at 16, 167/s at 32 (docs/benchmarks/encoder.md).
ENCODE_CHUNK = {"float32": 16, "bfloat16": 32, "int8": 8}
WRITE_ENCODE_TEXTS = 32  # texts of a write embedded per model-thread job

# Batcher names: also the names the logs and Stats use.
TEXT, SPEECH, OCR, IMAGE = "text encoder", "speech", "ocr", "image encoder"


def dtype_name(dtype) -> str:
    """"bfloat16" for torch.bfloat16 (answering keeps torch out of its imports)."""
    return str(dtype).removeprefix("torch.")


def split_rows(rows: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Consecutive slices of rows, counts[i] rows each."""
    out, start = [], 0
    for n in counts:
        out.append(rows[start : start + n])
        start += n
    return out


class Models:
    """Loads the text encoder, Whisper, OCR and CLIP as configured, and owns their threads
    and batchers.

    The torch models (text encoder, Whisper, CLIP) share one thread. torch's OpenMP (libgomp)
    gives each calling thread its own team, and once more OpenMP threads exist than cores it
    stops spin-waiting between parallel regions: on 2 cores a second torch thread made one
    MiniLM sentence take 13.6 ms instead of 5.9 and a Whisper utterance 311 ms instead of 169, in
    every thread (docs/benchmarks/tuning.md). The batchers run one batch at a time there, so
    the models need no locks. OCR (onnxruntime, its own pool) keeps a thread of its own.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = "cpu"
        self.encoder = None  # TextEncoder
        # Padded tokens per text-encoder forward pass (CPU); 0: a batch in one pass (a GPU).
        self.token_budget = 0
        self.speech = None  # SpeechRecognizer when voice is on
        self.reader = None  # TextReader when OCR is on
        self.image_encoder = None  # ImageEncoder when CLIP is configured
        self.components: list[Component] = []
        self.model_exec = ThreadPoolExecutor(1, thread_name_prefix="models")
        self.ocr_exec = ThreadPoolExecutor(1, thread_name_prefix="ocr")
        self.decode_exec = ThreadPoolExecutor(2, thread_name_prefix="decode")
        self.batchers: dict[str, MicroBatcher] = {}
        self.on_batch: Callable[[str, int], None] | None = None  # (model, items) per batch

    def load(self) -> None:
        """Loads every configured model (blocking; call it on the model thread)."""
        from supportqa_server.answering.calibration import out_of_scope_pool
        from supportqa_server.runtime.devices import configure_threads, resolve_device
        from supportqa_server.runtime.text_runtime import load_text_encoder, tuned_token_budget

        s = self.settings
        configure_threads(s.torch_threads)
        self.device = resolve_device(s.device)
        t0 = time.perf_counter()
        self.encoder = load_text_encoder(
            s.text_model, self.device, s.precision, s.cache_dir, s.text_runtime,
            s.torch_threads, ENCODE_CHUNK,
        )
        detail = dtype_name(self.encoder.dtype)
        if self.encoder.runtime != "torch":
            detail = f"{self.encoder.runtime} ({detail})"
        if self.device == "cpu":
            self.token_budget = s.text_token_budget or tuned_token_budget(
                self.encoder, s.cache_dir, s.torch_threads, texts=out_of_scope_pool())
            detail += f", {self.token_budget} tokens a pass"
        log.info("text encoder %s on %s, %s, in %.1f s", self.encoder.model_name, self.device,
                 detail, time.perf_counter() - t0)
        self.components.append(Component(
            "text_encoder", self.encoder.model_name, self.device, detail=detail,
        ))
        self._load_speech()
        self._load_vision()

    def _load_speech(self) -> None:
        s = self.settings
        if not s.speech_model:
            self.components.append(Component(
                "speech", enabled=False, detail="off: set SUPPORTQA_SPEECH_MODEL to tiny.en or base"
            ))
            return
        from supportqa_server.speech.transcribe import SpeechRecognizer

        t0 = time.perf_counter()
        self.speech = SpeechRecognizer(
            s.speech_model, self.device, cache_dir=s.cache_dir, trim_audio=s.speech_trim,
            beam_size=s.speech_beam_size or None, lm_weight=s.speech_lm_weight,
            precision=s.precision,
        )
        log.info("speech %s in %.1f s", s.speech_model, time.perf_counter() - t0)
        self.components.append(Component(
            "speech", s.speech_model, self.device, detail=dtype_name(self.speech.dtype),
        ))

    def _load_vision(self) -> None:
        s = self.settings
        if s.ocr:
            from supportqa_server.vision.ocr import TextReader

            self.reader = TextReader()
            self.components.append(Component("ocr", "rapidocr PP-OCR (bundled)", "cpu"))
        else:
            self.components.append(Component("ocr", enabled=False, detail="off: SUPPORTQA_OCR"))
        if s.clip_model:
            from supportqa_server.vision.clip_model import ImageEncoder

            self.image_encoder = ImageEncoder(s.clip_model, self.device, s.precision)
            self.components.append(Component(
                "image_encoder", self.image_encoder.model_name, self.device,
                detail=f"{self.image_encoder.dim}-d",
            ))
        else:
            self.components.append(Component(
                "image_encoder", enabled=False,
                detail="off: the See route needs SUPPORTQA_CLIP_MODEL (a CLIP path or hub id)",
            ))

    def start(self, question_batch: Callable[[list], list], speech_lm: Callable) -> None:
        """Starts a batcher per loaded model.

        Args:
            question_batch: Embeds and searches a batch of questions (on the model thread).
            speech_lm: knowledge base -> its speech language model or None (model thread).
        """
        s = self.settings

        def batcher(name: str, fn, executor, max_batch: int, max_wait_ms: float,
                    max_queue_ms: float = s.max_queue_ms) -> None:
            self.batchers[name] = MicroBatcher(
                fn, executor=executor, max_batch=max_batch, max_wait_ms=max_wait_ms,
                max_queue=s.max_queue, max_queue_ms=max_queue_ms, name=name,
                on_batch=self.on_batch,
            )

        # A question's search runs in its encoder batch's job, on the model thread: on 2 cores
        # a search beside the next encode made both slower (12 questions: encode 29-32 -> 51
        # ms, search ~8 -> 31 ms), so in turns more gets done (docs/benchmarks/tuning.md).
        batcher(TEXT, question_batch, self.model_exec, s.max_batch, s.max_wait_ms)
        if self.speech is not None:
            batcher(SPEECH, lambda items: self._transcribe_batch(items, speech_lm),
                    self.model_exec, s.speech_max_batch, s.speech_max_wait_ms,
                    s.speech_max_queue_ms)
        if self.reader is not None:
            batcher(OCR, self.reader.read_batch, self.ocr_exec, s.ocr_max_batch, 0.0,
                    s.speech_max_queue_ms)
        if self.image_encoder is not None:
            batcher(IMAGE, lambda images: list(self.image_encoder.embed_images(images)),
                    self.model_exec, s.max_batch, s.max_wait_ms)

    async def close(self) -> None:
        """Stops the batchers (logging what they did); the threads end after the store's."""
        for name, b in self.batchers.items():
            await b.close()
            st = b.stats
            if st.batches:  # what max_batch / max_wait tuning needs to know
                log.info("%s: %d items in %d batches (mean %.1f, largest %d); %d dropped, "
                         "%d refused; ran %.1f s, items queued %.1f ms on average", name,
                         st.items, st.batches, st.items / st.batches, max(st.sizes), st.dropped,
                         st.rejected, st.busy_s, 1000 * st.waited_s / st.items)

    def shutdown(self) -> None:
        for ex in (self.model_exec, self.ocr_exec, self.decode_exec):
            ex.shutdown(wait=False)

    async def submit(self, name: str, item, timeout: float | None):
        """Runs one item through the named batcher; raises what its batch raised for it."""
        result = await self.batchers[name].submit(item, timeout=timeout)
        if isinstance(result, Exception):
            raise result
        return result

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Question vectors (model thread). A GPU takes the whole batch in one pass."""
        assert self.encoder is not None
        return list(self.encoder.encode_sorted(texts, len(texts), self.token_budget))

    def _transcribe_batch(self, items: list[tuple[np.ndarray, str, str]], speech_lm) -> list:
        """(audio, language, knowledge base) -> Transcription, or the exception of the item's
        language group (one decode per language)."""
        assert self.speech is not None
        out: list = [None] * len(items)
        by_language: dict[str, list[int]] = {}
        for i, (_, language, _) in enumerate(items):
            by_language.setdefault(language, []).append(i)
        for language, idx in by_language.items():
            try:
                found = self.speech.transcribe_batch(
                    [items[i][0] for i in idx], language or None,
                    [speech_lm(items[i][2]) for i in idx],
                )
            except Exception as e:  # noqa: BLE001 - one language group's failure is its own
                found = [e] * len(idx)
            for i, r in zip(idx, found, strict=True):
                out[i] = r
        return out

    async def write_vectors(self, texts: list[list[str]]) -> list[np.ndarray]:
        """Per entry, the vectors of its texts.

        A slice of WRITE_ENCODE_TEXTS at a time, each its own job on the model thread:
        questions' batches run between the slices, so a bulk ingest holds a question back by
        one slice, not by its whole batch of entries.
        """
        assert self.encoder is not None
        loop = asyncio.get_running_loop()
        flat = [t for ts in texts for t in ts]
        vecs = np.concatenate([
            await loop.run_in_executor(
                self.model_exec, self.encoder.encode_sorted, flat[i : i + WRITE_ENCODE_TEXTS],
                WRITE_ENCODE_TEXTS, self.token_budget)
            for i in range(0, len(flat), WRITE_ENCODE_TEXTS)
        ])
        return split_rows(vecs, [len(ts) for ts in texts])

    async def see_vectors(
        self, entries: Sequence, texts: list[list[str]],
        images: Sequence[Sequence[ImageInput]] | None,
    ) -> tuple[list, list[np.ndarray]]:
        """CLIP vectors per entry (its images, then its texts) and entries with see_rows set."""
        from supportqa_server.vision.images import load_image

        assert self.image_encoder is not None
        enc, s = self.image_encoder, self.settings
        loop = asyncio.get_running_loop()
        per_entry = list(images or [[]] * len(entries))
        pictures = []
        for e, pics in zip(entries, per_entry, strict=True):
            for j, img in enumerate(pics):
                try:
                    pictures.append(await loop.run_in_executor(
                        self.decode_exec,
                        lambda img=img: load_image(
                            img.data, img.mime_type, max_bytes=s.max_image_bytes,
                            max_pixels=s.max_image_pixels,
                            max_decode_bytes=s.max_image_decode_bytes),
                    ))
                except (InvalidInput, TooLarge) as err:
                    raise type(err)(f"entry {e.id!r}, image {j + 1}: {err}") from err
        flat_texts = [t for ts in texts for t in ts]
        img_vecs = (await loop.run_in_executor(self.model_exec, enc.embed_images, pictures)
                    if pictures else np.zeros((0, enc.dim), np.float32))
        txt_vecs = await loop.run_in_executor(self.model_exec, enc.embed_texts, flat_texts)
        img_split = split_rows(img_vecs, [len(p) for p in per_entry])
        txt_split = split_rows(txt_vecs, [len(ts) for ts in texts])
        out_entries, out_vecs = [], []
        for e, iv, tv in zip(entries, img_split, txt_split, strict=True):
            out_entries.append(replace(e, image_count=len(iv), see_rows=len(iv) + len(tv)))
            out_vecs.append(np.concatenate([iv, tv]) if len(iv) else tv)
        return out_entries, out_vecs
