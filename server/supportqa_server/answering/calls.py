"""A whole phone call in one Converse stream: the caller's turns found by the VAD
(speech/vad.py), each answered as it ends while the stream stays open for the next.

Per turn: SpeechStarted (a bot playing a prompt stops it: barge-in), Accepted with the turn's
request id, partial Transcripts while the caller speaks, then the final Transcript, the
answers and Done(turn). A turn the knowledge base cannot answer alone is asked again with the
previous turn's question before it ("and how long does that take?" after "how do I get a
refund"), and answered so if that clears the threshold.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from supportqa_server.answering.search import us_since
from supportqa_server.answering.types import (
    Accepted,
    AskRequest,
    ConverseStart,
    Done,
    EndOfUtterance,
    Event,
    NoAnswer,
    SpeechStarted,
    Timings,
    Transcript,
)
from supportqa_server.errors import InvalidInput, Overloaded
from supportqa_server.speech.audio import RAW_BYTES, RawStream

BYTES_PER_SAMPLE = 4  # a turn's 16 kHz float32 samples, as counted against the audio budget


async def converse_call(p, first: ConverseStart, req: AskRequest,
                        receive: Callable[[], Awaitable[object]]) -> AsyncIterator[Event]:
    """Answers every turn of a whole-call Converse stream (see the module doc)."""
    from supportqa_server.answering.converse import partial_transcript
    from supportqa_server.speech.vad import TurnDetector, load_vad

    if first.format not in RAW_BYTES:
        raise InvalidInput(
            f"a whole-call Converse needs raw audio (PCM16, mu-law or A-law), not "
            f"{first.format.upper() or 'a container format'}: telephony gateways send raw "
            "frames")
    s = p.settings
    audio = RawStream(first.format, first.sample_rate_hz, first.channels)
    vad = await asyncio.get_running_loop().run_in_executor(p.models.decode_exec, load_vad)
    turns = TurnDetector(vad, first.end_silence_ms or s.turn_silence_ms, s.max_audio_seconds)
    turn, held = 0, 0  # turns answered; bytes of the current turn held against the budget
    context = ""  # the previous turn's question
    partial: asyncio.Task | None = None
    partial_at = 0  # samples of the turn at its last partial transcript
    t_turn = time.perf_counter()
    try:
        while True:
            msg = await receive()
            if isinstance(msg, ConverseStart):
                raise InvalidInput("ConverseConfig may only be the first message")
            if msg is None or isinstance(msg, EndOfUtterance):
                events = [ev for ev in [turns.flush()] if ev is not None]
            else:
                events = turns.feed(audio.feed(msg))
            for ev in events:
                if ev.kind == "start":
                    t_turn = time.perf_counter()
                    yield SpeechStarted(turn, ev.at_ms)
                    yield Accepted(uuid.uuid4().hex)
                    continue
                if partial is not None:
                    # Let a partial transcript finish rather than cancel it: once its batch
                    # runs it cannot be stopped, and the turn's final transcript queued
                    # behind it would be refused as overload by the wait it estimates.
                    await asyncio.wait([partial])
                    partial, partial_at = None, 0
                p.buffered_audio -= held
                held = 0
                async for out in _answer_turn(p, req, ev.audio, turn, context, t_turn):
                    if isinstance(out, Transcript) and out.final and out.text.strip():
                        context = out.text.strip()
                    yield out
                turn += 1
            if msg is None:
                return
            if not turns.in_turn:
                continue
            grown = turns.turn_samples * BYTES_PER_SAMPLE - held
            if p.buffered_audio + grown > s.max_buffered_audio_bytes:
                raise Overloaded(
                    f"this server holds {s.max_buffered_audio_bytes / 2**20:.0f} MiB of "
                    "streamed audio already (SUPPORTQA_MAX_BUFFERED_AUDIO_BYTES); retry with "
                    "backoff")
            p.buffered_audio += grown
            held += grown
            if partial is not None and partial.done():
                heard, partial = partial.result(), None
                if heard is not None and heard.text and turns.in_turn:
                    yield Transcript(heard.text, heard.language, False)
            # the turn is joined only for a partial transcript, not for every 20 ms frame
            n = turns.turn_samples
            if partial is None and n - partial_at >= 16000 * s.partial_seconds:
                partial_at = n
                partial = asyncio.create_task(partial_transcript(p, turns.turn_audio(), req))
    finally:
        p.buffered_audio -= held
        if partial is not None:
            partial.cancel()


async def _answer_turn(p, req: AskRequest, samples, turn: int, context: str,
                       t_start: float) -> AsyncIterator[Event]:
    """One turn's final transcript, answers and Done. A NoAnswer is asked again with the
    previous turn's question as context, whose answers replace it when they clear the
    threshold."""
    timings = Timings()
    events = [ev async for ev in p.answer_accepted(req, samples, timings, t_start)]
    heard = next((ev.text for ev in events if isinstance(ev, Transcript)), "").strip()
    if context and heard and any(isinstance(ev, NoAnswer) for ev in events):
        t0 = time.perf_counter()
        again = [ev async for ev in p.answer_accepted(
            replace(req, text=f"{context} {heard}"), None, Timings(), t0)]
        if not any(isinstance(ev, NoAnswer) for ev in again):
            timings.rank_us += us_since(t0)
            events = [ev for ev in events if isinstance(ev, Transcript)] + [
                ev for ev in again if not isinstance(ev, Done)] + [events[-1]]
    for ev in events:
        yield replace(ev, turn=turn) if isinstance(ev, Done) else ev
