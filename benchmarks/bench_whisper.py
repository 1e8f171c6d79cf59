"""Whisper on this machine: our SpeechRecognizer (trim on/off, batched) against faster-whisper.

Prints markdown. Every configuration transcribes the same clips in turn, round after round, so
background load hits all of them alike; cells are medians over clips and rounds, as wall time
and as CPU time of the whole process (all threads), which moves less when others share the
cores. WER is corpus WER after whisper's English normaliser.

    python benchmarks/bench_whisper.py --rounds 2 --synthetic 24
    python benchmarks/bench_whisper.py --models tiny.en --rounds 1 --synthetic 0
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import SHARED_DATA  # noqa: E402
from supportqa_server.speech.audio import SAMPLE_RATE, decode_audio  # noqa: E402
from supportqa_server.speech.whisper_convert import BUNDLED, bundled_model_dir, package_dir  # noqa: E402
from test_transcribe import word_error_rate  # noqa: E402

SPEECH = SHARED_DATA / "speech"

BATCH = 8  # clips per batched call, as the server's speech_max_batch
SNR_DB = 20.0  # white noise added to the synthetic questions


@dataclasses.dataclass
class Config:
    """One way of transcribing: a serial call, and a batched one where the engine has it."""

    model: str
    engine: str
    setting: str
    serial: Callable[[np.ndarray], str]
    batch: Callable[[list[np.ndarray]], list[str]] | None = None
    timed: bool = True  # False: WER only
    synthetic: bool = True  # also WER on the synthetic questions
    wall: list[float] = dataclasses.field(default_factory=list)  # s per clip
    cpu: list[float] = dataclasses.field(default_factory=list)
    rtf: list[float] = dataclasses.field(default_factory=list)
    long_wall: list[float] = dataclasses.field(default_factory=list)  # s for jfk (11 s)
    serial8: list[float] = dataclasses.field(default_factory=list)  # clips/s, 8 one by one
    batch8: list[float] = dataclasses.field(default_factory=list)  # clips/s, one batch of 8
    texts: list[str] = dataclasses.field(default_factory=list)  # speechbrain, first round
    batch_texts: list[str] = dataclasses.field(default_factory=list)
    jfk_text: str = ""
    synthetic_texts: list[str] = dataclasses.field(default_factory=list)


def timed(fn, *args):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w, time.process_time() - c


def _auto_precision() -> str:
    from supportqa_server.runtime.devices import resolve_precision

    return str(resolve_precision("auto", "cpu")).removeprefix("torch.")


def ours(model: str, cache_dir: Path, kb_texts: list[str]) -> list[Config]:
    """Our SpeechRecognizer, trimmed and not; for WER only, trimmed with parts of it left out.
    For tiny.en also the server's default decoding (5 beams, a KB language model from
    ``kb_texts``) and its parts."""
    import torch
    import whisper
    from supportqa_server.speech.transcribe import SpeechRecognizer

    rec = SpeechRecognizer(model, "cpu", cache_dir=cache_dir)  # the server's precision
    # float32 beside it when the server's (auto) precision is another one
    rec32 = (
        SpeechRecognizer(model, "cpu", cache_dir=cache_dir, precision="float32")
        if rec.dtype != torch.float32 else None
    )

    greedy = rec._options
    lm = rec.knowledge_lm(kb_texts) if kb_texts else None

    def with_trim(trim: bool, beams: int | None = None, lm_weight: float = 0.0, r=rec):
        def setup(n: int):
            r.trim_audio = trim
            r._options = dataclasses.replace(greedy, beam_size=beams)
            r.lm_weight = lm_weight
            return [lm] * n if lm_weight else None

        def serial(clip):
            return r.transcribe_batch([clip], lms=setup(1))[0].text

        def batch(clips):
            return [t.text for t in r.transcribe_batch(clips, lms=setup(len(clips)))]

        return serial, batch

    @torch.inference_mode()
    def audio_ctx_only(clip):
        """Decoder attends to the trimmed positions only (whisper.cpp's audio_ctx)."""
        rec.trim_audio, rec._options, rec.lm_weight = True, greedy, 0.0
        mel = rec._mel(clip)[:, : rec._n_frames(len(clip))][None]
        features = rec.model.encoder(mel)
        view = copy.copy(rec.model)  # decode() must believe n_audio_ctx is the trimmed length
        view.dims = dataclasses.replace(rec.model.dims, n_audio_ctx=features.shape[1])
        lang = None if rec.multilingual else "en"
        options = dataclasses.replace(
            rec._options, language=lang, sample_len=rec._token_budget(len(clip))
        )
        return whisper.decode(view, features, options)[0].text

    @torch.inference_mode()
    def prior_outputs_only(clip):
        """Decoder sees the prior's outputs past the clip; encoder attention does not."""
        rec.trim_audio, rec._options, rec.lm_weight = True, greedy, 0.0
        mel = rec._mel(clip)
        features = rec.model.encoder(mel[:, : rec._n_frames(len(clip))][None])[0]
        prior = rec._prior(float(mel[:, -1].mean()))
        features = torch.cat([features, prior.features[features.shape[0] :]])[None]
        lang = None if rec.multilingual else "en"
        options = dataclasses.replace(
            rec._options, language=lang, sample_len=rec._token_budget(len(clip))
        )
        return whisper.decode(rec.model, features, options)[0].text

    decoding = []
    if rec32 is not None:
        decoding.append(Config(model, "openai-whisper", "float32, trim on, greedy",
                               *with_trim(True, r=rec32)))
    if model == "tiny.en" and lm is not None:
        decoding += [
            Config(model, "openai-whisper", "trim, 5 beams + KB LM (server default)",
                   *with_trim(True, 5, 0.3)),
            *([Config(model, "openai-whisper", "float32, trim, 5 beams + KB LM",
                      *with_trim(True, 5, 0.3, r=rec32))] if rec32 is not None else []),
            Config(model, "openai-whisper", "trim, 5 beams", *with_trim(True, 5)),
            Config(model, "openai-whisper", "trim, greedy + KB LM", *with_trim(True, None, 0.3)),
        ]
    return [
        Config(model, "openai-whisper", "trim on, greedy", *with_trim(True)),
        *decoding,
        Config(model, "openai-whisper", "trim off (30 s), greedy", *with_trim(False)),
        Config(
            model,
            "openai-whisper",
            "trim, no silence prior",
            audio_ctx_only,
            timed=False,
            synthetic=False,
        ),
        Config(
            model,
            "openai-whisper",
            "trim, prior for the decoder only",
            prior_outputs_only,
            timed=False,
        ),
    ]


def faster(model: str, model_dir: Path, threads: int) -> list[Config]:
    from faster_whisper import WhisperModel

    configs = []
    for compute_type in ("int8", "float32"):
        fw = WhisperModel(
            str(model_dir), device="cpu", compute_type=compute_type, cpu_threads=threads
        )

        def serial(clip, fw=fw):
            segments, _ = fw.transcribe(
                clip,
                beam_size=1,
                temperature=0.0,
                without_timestamps=True,
                condition_on_previous_text=False,
                vad_filter=False,
            )
            return " ".join(s.text.strip() for s in segments)

        configs.append(
            Config(model, "faster-whisper", compute_type, serial, synthetic=compute_type == "int8")
        )
    return configs


def faster_model_dir(model: str, tmp: Path) -> Path:
    """tiny.en's package dir is a CTranslate2 model dir; base's parts are joined into one."""
    if len(BUNDLED[model].parts) == 1:
        return bundled_model_dir(model)
    src = bundled_model_dir(model)
    out = tmp / model
    out.mkdir()
    with open(out / "model.bin", "wb") as f:
        for package, rel in BUNDLED[model].parts:
            f.write((package_dir(package) / rel).read_bytes())
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (out / name).symlink_to(src / name)
    return out


def synthetic_questions(n: int, cache: Path) -> tuple[list[np.ndarray], list[str]]:
    """banking77 questions spoken by espeak-ng (two voices, two speeds) with hiss and pauses."""
    from supportqa_tools import synth

    with open(SPEECH.parent / "text" / "banking77" / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    random.Random(0).shuffle(rows)
    texts = [r["text"] for r in rows[:n]]
    rng = np.random.default_rng(0)
    clips = []
    for i, text in enumerate(texts):
        wav = synth.synthesize_speech(
            text, voice=("en-us", "en-gb")[i % 2], speed_wpm=(150, 180)[i // 2 % 2], cache_dir=cache
        )
        x = decode_audio(wav)
        lead, trail = (np.zeros(int(SAMPLE_RATE * rng.uniform(*r)), np.float32) for r in
                       ((0.1, 0.8), (0.2, 1.5)))  # fmt: skip
        x = np.concatenate([lead, x, trail])
        noise = rng.standard_normal(x.size) * np.sqrt(np.mean(x**2)) / 10 ** (SNR_DB / 20)
        clips.append((x + noise).astype(np.float32))
    return clips, texts


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--synthetic", type=int, default=24, help="espeak-ng questions; 0 skips")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "bench_whisper")
    args = ap.parse_args()

    import ctranslate2
    import faster_whisper
    import torch
    import whisper

    started = time.perf_counter()
    load_before = os.getloadavg()
    threads = torch.get_num_threads()
    folder = SPEECH / "speechbrain"
    with open(folder / "transcripts.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    clips = [decode_audio((folder / r["file"]).read_bytes()) for r in rows]
    refs = [r["transcript"] for r in rows]
    jfk = decode_audio((SPEECH / "jfk" / "jfk.flac").read_bytes())
    syn_clips, syn_refs = [], []
    if args.synthetic:
        syn_clips, syn_refs = synthetic_questions(args.synthetic, args.cache_dir / "tts")

    # The KB language model's texts: BANKING77 train past the rows spoken as synthetic
    # questions, so the model has not seen the sentences it is scored on.
    with open(SPEECH.parent / "text" / "banking77" / "train.csv", newline="") as f:
        kb_texts = [r["text"] for r in list(csv.DictReader(f))[max(args.synthetic, 1) :]]
    tmp = Path(tempfile.mkdtemp(prefix="bench-whisper-"))
    configs: list[Config] = []
    for model in args.models:
        configs += ours(model, args.cache_dir / "checkpoints", kb_texts)
        configs += faster(model, faster_model_dir(model, tmp), threads)
    for c in configs:  # warm-up: lazy inits, silence priors, first-call allocations
        c.serial(clips[0])
        c.serial(jfk)

    for rnd in range(args.rounds):
        for c in configs:
            if not c.timed and rnd:
                continue
            round_wall = []
            for clip in clips:
                text, w, cpu = timed(c.serial, clip)
                round_wall.append(w)
                c.wall.append(w)
                c.cpu.append(cpu)
                c.rtf.append(w / (len(clip) / SAMPLE_RATE))
                if rnd == 0:
                    c.texts.append(text)
            c.serial8.append(BATCH / sum(round_wall[:BATCH]))
            text, w, _ = timed(c.serial, jfk)
            c.long_wall.append(w)
            c.jfk_text = c.jfk_text or text
            if c.batch is not None:
                texts, w, _ = timed(c.batch, clips[:BATCH])
                c.batch8.append(BATCH / w)
                if rnd == 0:
                    c.batch_texts = texts + c.batch(clips[BATCH:])
    for c in configs:
        if not syn_clips or not c.synthetic:
            continue
        if c.batch is not None:
            for k in range(0, len(syn_clips), BATCH):
                c.synthetic_texts += c.batch(syn_clips[k : k + BATCH])
        else:
            c.synthetic_texts = [c.serial(x) for x in syn_clips]
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()

    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    print("# Whisper on CPU: trimmed encoder, batching, and faster-whisper\n")
    print(f"Command: `python benchmarks/bench_whisper.py{' ' + argv if argv else ''}`  ")
    print(
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, torch {torch.__version__} ({threads} threads), "
        f"openai-whisper {whisper.__version__}, faster-whisper {faster_whisper.__version__}, "
        f"ctranslate2 {ctranslate2.__version__}; "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {elapsed / 60:.1f} min. Load average "
        f"{load_before[0]:.1f} at start, {load_after[0]:.1f} at end (other jobs shared the "
        f"cores: compare rows with each other, not with other runs).  "
    )
    durations = [len(c) / SAMPLE_RATE for c in clips]
    print(
        f"Clips: the {len(clips)} speechbrain sentences ({min(durations):.1f}-"
        f"{max(durations):.1f} s, real speech) one by one, {args.rounds} round(s); jfk.flac "
        f"(11 s); batch = the first {BATCH} sentences in one call. Greedy decoding unless the "
        "setting says beams; the KB LM (weight 0.3) is built from BANKING77 train past the "
        "synthetic questions' rows; no timestamps; language detected by base. "
        f"Our rows compute in the server's precision on this CPU ({_auto_precision()}); rows "
        "named float32 are the same model in float32.\n"
    )
    print("## Latency and throughput\n")
    print(
        "| model | engine | setting | per clip, wall (ms) | per clip, CPU (ms) | RTF | "
        "jfk 11 s (ms) | 8 one by one (clips/s) | batch of 8 (clips/s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c in configs:
        if not c.timed:
            continue
        b8 = f"{median(c.batch8):.2f}" if c.batch8 else "-"
        print(
            f"| {c.model} | {c.engine} | {c.setting} | {median(c.wall) * 1e3:.0f} | "
            f"{median(c.cpu) * 1e3:.0f} | {median(c.rtf):.3f} | {median(c.long_wall) * 1e3:.0f} | "
            f"{median(c.serial8):.2f} | {b8} |"
        )
    print("\nRTF: wall time / clip duration, median over clips (below 1 is faster than speech).\n")

    print("## Word error rate\n")
    syn_head = f" synthetic {len(syn_clips)} (espeak-ng, {SNR_DB:g} dB SNR) |" if syn_clips else ""
    print(f"| model | engine | setting | speechbrain, one by one | speechbrain, batched |"
          f"{syn_head} jfk |")  # fmt: skip
    print("|---|---|---|---|---|" + ("---|" if syn_clips else "") + "---|")
    for c in configs:
        batched = f"{word_error_rate(refs, c.batch_texts):.3f}" if c.batch_texts else "-"
        syn = f" {word_error_rate(syn_refs, c.synthetic_texts):.3f} |" if c.synthetic_texts else ""
        if syn_clips and not c.synthetic_texts:
            syn = " - |"
        heard = c.jfk_text.lower()
        jfk_ok = "ok" if "my fellow americans" in heard and "your country" in heard else "wrong"
        print(
            f"| {c.model} | {c.engine} | {c.setting} | {word_error_rate(refs, c.texts):.3f} | "
            f"{batched} |{syn} {jfk_ok} |"
        )
    print(
        "\nspeechbrain's transcripts.tsv does not match 4 of its 10 clips (see "
        "tests/test_transcribe.py): a perfect recogniser scores about 0.20 there.\n"
    )
    print("## Transcripts that differ between trim on and trim off\n")
    by_key = {(c.model, c.setting): c for c in configs}
    any_diff = False
    for model in args.models:
        on, off = by_key[(model, "trim on, greedy")], by_key[(model, "trim off (30 s), greedy")]
        for ref, a, b in zip(refs + syn_refs, on.texts + on.synthetic_texts,
                             off.texts + off.synthetic_texts, strict=True):  # fmt: skip
            if a != b:
                any_diff = True
                print(f"- {model}: ref `{ref}`; on `{a[:160]}`; off `{b[:160]}`")
        ctx = by_key[(model, "trim, no silence prior")]
        loops = sum(len(t) > 2 * len(r) + 20 for t, r in zip(ctx.texts, refs, strict=True))
        print(f"- {model}, trim without silence prior: {loops} of {len(refs)} speechbrain "
              f"transcripts run on past twice the reference length (repetition)")  # fmt: skip
    if not any_diff:
        print("- none")


if __name__ == "__main__":
    main()
