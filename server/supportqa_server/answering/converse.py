"""Streamed speech (the Converse rpc): audio chunks buffered within budgets, partial
transcripts, the end of an utterance, then the answer flow of the pipeline. A whole call of
many turns goes to calls.py."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import numpy as np

from supportqa_server.answering.models import SPEECH
from supportqa_server.answering.search import us_since
from supportqa_server.answering.types import (
    Accepted,
    AskRequest,
    ConverseMessage,
    ConverseStart,
    EndOfUtterance,
    Event,
    Timings,
    Transcript,
)
from supportqa_server.errors import Cancelled, InvalidInput, Overloaded, TooLarge
from supportqa_server.speech.audio import RAW_BYTES


async def converse(
    p, messages: AsyncIterator[ConverseMessage], timeout: float | None
) -> AsyncIterator[Event]:
    """Answers a question spoken as a stream of audio chunks (see the Converse rpc)."""

    t_start = time.perf_counter()
    idle = p.settings.stream_idle_seconds

    async def receive():
        """The next message, or None at the stream's end; a stream silent for longer than
        SUPPORTQA_STREAM_IDLE_SECONDS is ended, so an idle caller holds no buffer."""
        try:
            return await asyncio.wait_for(anext(messages, None), idle)
        except TimeoutError:
            raise Cancelled(
                f"the Converse stream sent nothing for {idle:g} s and was closed: send "
                "audio as it is captured, and EndOfUtterance when the caller is done"
            ) from None

    first = await receive()
    if not isinstance(first, ConverseStart):
        raise InvalidInput("the first Converse message must be a ConverseConfig")
    if first.request.text or first.request.audio or first.request.image:
        raise InvalidInput("ConverseConfig.question must not carry text, audio or image")
    if first.format in RAW_BYTES and not 8000 <= first.sample_rate_hz <= 48000:
        raise InvalidInput(
            f"ConverseConfig.sample_rate_hz is {first.sample_rate_hz}; {first.format.upper()} "
            "chunks need 8000..48000 (8000 on a phone line)"
        )
    req = replace(p.check(first.request, audio_expected=True), timeout=timeout)
    if first.whole_call:
        from supportqa_server.answering.calls import converse_call

        async for ev in converse_call(p, first, req, receive):
            yield ev
        return
    s = p.settings
    # The most one utterance may buffer: max_audio_seconds of PCM16, and for every format
    # the per-stream budget.
    max_bytes = s.max_stream_audio_bytes
    if first.format in RAW_BYTES:
        per_s = RAW_BYTES[first.format] * (first.channels or 1) * first.sample_rate_hz  # B/s
        max_bytes = min(max_bytes, int(per_s * s.max_audio_seconds))
    timings = Timings()
    yield Accepted(uuid.uuid4().hex)
    buf = bytearray()
    try:
        async for ev in _receive_utterance(p, receive, first, req, buf, max_bytes):
            yield ev
    finally:
        p.buffered_audio -= len(buf)
    if not buf:
        raise InvalidInput("the utterance holds no audio: send audio_chunk messages")
    t0 = time.perf_counter()
    utterance = await asyncio.get_running_loop().run_in_executor(
        p.models.decode_exec, _decode_buffer, p, bytes(buf), first)
    del buf[:]
    timings.decode_us += us_since(t0)
    async for ev in p.answer_accepted(req, utterance, timings, t_start):
        yield ev

def _decode_buffer(p, data: bytes, first: ConverseStart) -> np.ndarray:
    from supportqa_server.speech.audio import decode_audio

    channels = first.channels or 1
    frame = RAW_BYTES.get(first.format, 1) * channels
    usable = len(data) - len(data) % frame
    return decode_audio(data[:usable], first.format, first.sample_rate_hz, channels,
                        max_seconds=p.settings.max_audio_seconds)

async def _receive_utterance(p, receive, first: ConverseStart, req: AskRequest,
                             buf: bytearray, max_bytes: int) -> AsyncIterator[Event]:
    """Buffers a Converse stream's audio into ``buf`` until the utterance ends; yields
    partial transcripts. Counts the buffer against the server's audio budget."""
    from supportqa_server.speech.audio import raw_samples, speech_end

    s = p.settings
    pcm = first.format in RAW_BYTES
    channels = first.channels or 1
    bytes_per_s = RAW_BYTES[first.format] * channels * first.sample_rate_hz if pcm else 0
    partial: asyncio.Task | None = None
    partial_at = 0  # buffer length at the last partial transcript, bytes
    try:
        while (msg := await receive()) is not None:
            if isinstance(msg, EndOfUtterance):
                break
            if isinstance(msg, ConverseStart):
                raise InvalidInput("ConverseConfig may only be the first message")
            if len(buf) + len(msg) > max_bytes:
                raise TooLarge(
                    f"the utterance is longer than {s.max_audio_seconds:g} s or "
                    f"{max_bytes / 2**20:.0f} MiB; end it with EndOfUtterance or use "
                    "end_silence_ms"
                )
            if p.buffered_audio + len(msg) > s.max_buffered_audio_bytes:
                raise Overloaded(
                    f"this server holds {s.max_buffered_audio_bytes / 2**20:.0f} MiB of "
                    "streamed audio already (SUPPORTQA_MAX_BUFFERED_AUDIO_BYTES); retry with "
                    "backoff"
                )
            buf += msg
            p.buffered_audio += len(msg)
            if partial is not None and partial.done():
                heard = partial.result()
                partial = None
                if heard is not None and heard.text:
                    yield Transcript(heard.text, heard.language, False)
            if not pcm:
                continue
            # The audio so far, unjudged: a silent or very short start is not an error yet.
            samples = raw_samples(bytes(buf), first.format, first.sample_rate_hz, channels)
            if first.end_silence_ms and speech_end(samples, silence_ms=first.end_silence_ms):
                break
            if partial is None and len(buf) - partial_at >= bytes_per_s * s.partial_seconds:
                partial_at = len(buf)
                partial = asyncio.create_task(partial_transcript(p, samples, req))
    finally:
        if partial is not None:
            partial.cancel()

async def partial_transcript(p, samples: np.ndarray, req: AskRequest):
    """The transcript of the audio so far, None when it fails (best effort)."""
    try:
        return await p.models.submit(
            SPEECH, (samples, req.language, req.knowledge_base), req.timeout
        )
    except Exception:  # noqa: BLE001 - a partial transcript is best effort
        return None
