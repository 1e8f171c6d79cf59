"""The caller's turns in a streamed call: Silero VAD (its ONNX model, from PyPI silero-vad)
scores 32 ms windows of 16 kHz audio, and a hysteresis turns the scores into turns.

silero-vad's own Python wrapper imports torchaudio, which would pull a second torch build;
the model file is read from the installed distribution instead, and the few lines that feed
it (a window, the previous window's last 64 samples, the recurrent state) are here.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from supportqa_server.errors import NotAvailable

SAMPLE_RATE = 16000  # Hz: the VAD and Whisper both read 16 kHz
WINDOW = 512  # samples the model scores at once at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window it sees again (the model's input layout)
WINDOW_MS = WINDOW * 1000 // SAMPLE_RATE  # 32
SPEECH_PROB = 0.5  # a window at or above this is speech (Silero's default threshold)
SILENCE_PROB = 0.35  # a window below this is not (Silero's hysteresis: 0.15 under)
MIN_SPEECH_MS = 200  # a shorter burst (a click, a cough, line noise) starts no turn
PRE_ROLL_MS = 300  # audio kept before the detected start, so Whisper hears the onset


def model_path() -> Path:
    """The ONNX model of the installed silero-vad distribution.

    Raises:
        NotAvailable: silero-vad is not installed.
    """
    try:
        dist = metadata.distribution("silero-vad")
    except metadata.PackageNotFoundError:
        raise NotAvailable(
            "whole-call Converse needs the silero-vad package (its ONNX model): run `make "
            "setup`, or `pip install --no-deps silero-vad==6.2.0`") from None
    path = Path(str(dist.locate_file("silero_vad/data/silero_vad.onnx")))
    if not path.is_file():
        raise NotAvailable(f"silero-vad is installed but its model {path} is missing")
    return path


class VadModel:
    """The ONNX session, shared by every call (a call's state travels with the call)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # One thread: a window is ~0.1 ms of work, and the cores belong to the encoders.
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._sr = np.array(SAMPLE_RATE, np.int64)

    def score(self, window: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        """(speech probability, next state) of one window with its context:
        (CONTEXT + WINDOW,) float32 and the (2, 1, 128) state."""
        prob, state = self.session.run(
            None, {"input": window[None, :], "state": state, "sr": self._sr})
        return float(prob[0, 0]), state


@functools.cache
def load_vad() -> VadModel:
    """The process's VAD model, loaded on first use (~10 ms)."""
    return VadModel(model_path())


@dataclass
class TurnEvent:
    kind: str  # "start" | "end"
    at_ms: int  # where in the call: start of speech, or end of the turn's audio
    audio: np.ndarray | None = None  # the turn's 16 kHz samples, on "end"


@dataclass
class TurnDetector:
    """One call's turns from its 16 kHz samples, fed as they arrive.

    A turn starts after MIN_SPEECH_MS of windows scoring SPEECH_PROB or more, its audio
    reaching PRE_ROLL_MS back; it ends after ``end_silence_ms`` of windows under SILENCE_PROB,
    or at ``max_turn_s``.
    """

    model: VadModel
    end_silence_ms: int
    max_turn_s: float
    _state: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), np.float32))
    _context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))
    _pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _windows: int = 0  # windows scored since the call began
    _pre_roll: collections.deque = field(default_factory=collections.deque)
    _turn: list[np.ndarray] | None = None  # the current turn's windows; None between turns
    _speech_run: int = 0  # consecutive speech windows before a turn starts
    _silence_run: int = 0  # consecutive non-speech windows within a turn

    @property
    def in_turn(self) -> bool:
        return self._turn is not None

    @property
    def turn_samples(self) -> int:
        """Samples of the current turn so far (0 between turns), without joining them."""
        return len(self._turn) * WINDOW if self._turn else 0

    def turn_audio(self) -> np.ndarray:
        """The current turn's samples so far (empty between turns)."""
        return np.concatenate(self._turn) if self._turn else np.zeros(0, np.float32)

    def feed(self, samples: np.ndarray) -> list[TurnEvent]:
        """Scores the whole windows of the samples so far; the events they make."""
        data = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        n = len(data) // WINDOW
        self._pending = data[n * WINDOW:]
        events: list[TurnEvent] = []
        for i in range(n):
            ev = self._window(data[i * WINDOW:(i + 1) * WINDOW])
            if ev is not None:
                events.append(ev)
        return events

    def flush(self) -> TurnEvent | None:
        """Ends the turn in progress (the caller hung up or sent EndOfUtterance)."""
        if self._turn is None:
            return None
        if len(self._pending):
            self._turn.append(self._pending)
            self._pending = np.zeros(0, np.float32)
        return self._end()

    def _window(self, window: np.ndarray) -> TurnEvent | None:
        prob, self._state = self.model.score(np.concatenate([self._context, window]),
                                             self._state)
        self._context = window[-CONTEXT:]
        self._windows += 1
        min_speech = max(1, MIN_SPEECH_MS // WINDOW_MS)
        if self._turn is None:
            self._pre_roll.append(window)
            # the pre-roll keeps the speech run and PRE_ROLL_MS before it
            while len(self._pre_roll) > self._speech_run + 1 + PRE_ROLL_MS // WINDOW_MS:
                self._pre_roll.popleft()
            self._speech_run = self._speech_run + 1 if prob >= SPEECH_PROB else 0
            if self._speech_run >= min_speech:
                start_ms = (self._windows - self._speech_run) * WINDOW_MS
                self._turn, self._pre_roll = list(self._pre_roll), collections.deque()
                self._silence_run = self._speech_run = 0
                return TurnEvent("start", start_ms)
            return None
        self._turn.append(window)
        if prob < SILENCE_PROB:
            self._silence_run += 1
        elif prob >= SPEECH_PROB:
            self._silence_run = 0
        too_long = len(self._turn) * WINDOW_MS >= self.max_turn_s * 1000
        if self._silence_run * WINDOW_MS >= self.end_silence_ms or too_long:
            return self._end()
        return None

    def _end(self) -> TurnEvent:
        audio = np.concatenate(self._turn) if self._turn else np.zeros(0, np.float32)
        self._turn, self._silence_run = None, 0
        return TurnEvent("end", self._windows * WINDOW_MS, audio)
