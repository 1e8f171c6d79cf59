"""Protobuf messages to pipeline types and back."""

from __future__ import annotations

from supportqa.v1 import supportqa_pb2 as pb

from supportqa_server.answering import pipeline as p
from supportqa_server.answering.rank import DENSE, LEXICAL, READ, SEE
from supportqa_server.knowledge.entries import EntryData
from supportqa_server.knowledge.questions import Feedback
from supportqa_server.knowledge.writer import WriteReport
from supportqa_server.learning import LintReport, Suggestion, SuggestOptions
from supportqa_server.learning.suggest import NEW_ENTRY, PARAPHRASES
from supportqa_server.runtime.settings import DEFAULT_KB


def _names(enum, prefix: str) -> dict[int, str]:
    """A proto enum's values as lower-case names without ``prefix``; UNSPECIFIED -> ""."""
    return {v: "" if enum.Name(v).endswith("_UNSPECIFIED") else
            enum.Name(v).removeprefix(prefix).lower() for v in enum.values()}


# AUDIO_FORMAT_FLAC -> "flac", as speech.audio.FORMATS names them; UNSPECIFIED -> "" (sniffed).
AUDIO_FORMATS = _names(pb.AudioFormat, "AUDIO_FORMAT_")
# BODY_FORMAT_HTML -> "html", as knowledge.articles.FORMATS names them; UNSPECIFIED -> "".
BODY_FORMATS = _names(pb.BodyFormat, "BODY_FORMAT_")
ROUTES = {DENSE: pb.ROUTE_DENSE, LEXICAL: pb.ROUTE_LEXICAL, READ: pb.ROUTE_READ, SEE: pb.ROUTE_SEE}


def ask_request(q: pb.Question, timeout: float | None) -> p.AskRequest:
    audio = image = None
    if q.HasField("audio") and (q.audio.data or q.audio.format):
        audio = p.AudioInput(
            bytes(q.audio.data), AUDIO_FORMATS.get(q.audio.format, "?"),
            q.audio.sample_rate_hz, q.audio.channels,
        )
    if q.HasField("image") and (q.image.data or q.image.mime_type):
        image = p.ImageInput(bytes(q.image.data), q.image.mime_type)
    return p.AskRequest(
        text=q.text,
        audio=audio,
        image=image,
        knowledge_base=q.knowledge_base or DEFAULT_KB,
        top_k=q.top_k or p.DEFAULT_TOP_K,
        min_score=q.min_score if q.HasField("min_score") else None,
        locale=q.locale,
        tags=tuple(t for t in q.tags if t),
        language=q.language,
        clarify=not q.no_clarify,
        timeout=timeout,
    )


def timings(t: p.Timings) -> pb.StageTimings:
    return pb.StageTimings(
        decode_us=t.decode_us, transcribe_us=t.transcribe_us, read_us=t.read_us,
        embed_us=t.embed_us, search_us=t.search_us, rank_us=t.rank_us, total_us=t.total_us,
    )


def answer(a: p.Answer) -> pb.Answer:
    e = a.entry
    out = pb.Answer(
        rank=a.rank, entry_id=e.id, title=e.title, score=a.score,
        # an article has no answer text of its own: its passage that matched is the answer
        answer=e.answer or (a.passage.text if a.passage else ""),
        routes=[ROUTES[r] for r in a.routes], matched_text=a.matched_text, url=e.url,
        tags=list(e.tags), short_answer=a.short_answer,
    )
    if a.passage is not None:
        ps = a.passage
        out.passage.CopyFrom(pb.Passage(text=ps.text, headings=list(ps.headings),
                                        start=ps.start, end=ps.end))
    return out


def transcript(t: p.Transcript) -> pb.Transcript:
    return pb.Transcript(text=t.text, language=t.language, final=t.final,
                         confidence=t.confidence)


def not_heard(n: p.NotHeard) -> pb.NotHeard:
    return pb.NotHeard(reason=n.reason, confidence=n.confidence)


def image_text(t: p.ImageText) -> pb.ImageText:
    return pb.ImageText(lines=[pb.TextLine(text=s, confidence=c) for s, c in t.lines])


def no_answer(n: p.NoAnswer) -> pb.NoAnswer:
    return pb.NoAnswer(reason=n.reason, best_score=n.best_score, threshold=n.threshold)


def clarify(c: p.Clarify) -> pb.Clarify:
    return pb.Clarify(reason=c.reason, options=[
        pb.ClarifyOption(entry_id=e, title=t, score=s) for e, t, s in c.options])


def event(ev: p.Event) -> pb.AnswerEvent:
    match ev:
        case p.Accepted():
            return pb.AnswerEvent(accepted=pb.Accepted(request_id=ev.request_id))
        case p.Transcript():
            return pb.AnswerEvent(transcript=transcript(ev))
        case p.ImageText():
            return pb.AnswerEvent(image_text=image_text(ev))
        case p.Answer():
            return pb.AnswerEvent(answer=answer(ev))
        case p.NoAnswer():
            return pb.AnswerEvent(no_answer=no_answer(ev))
        case p.Clarify():
            return pb.AnswerEvent(clarify=clarify(ev))
        case p.NotHeard():
            return pb.AnswerEvent(not_heard=not_heard(ev))
        case p.Done():
            return pb.AnswerEvent(done=pb.Done(timings=timings(ev.timings), turn=ev.turn))
        case p.SpeechStarted():
            return pb.AnswerEvent(speech_started=pb.SpeechStarted(turn=ev.turn,
                                                                  at_ms=ev.at_ms))
    raise TypeError(f"unknown event {ev!r}")


def fold(events: list[p.Event]) -> pb.AnswerSet:
    """The unary AnswerSet of a complete event list."""
    out = pb.AnswerSet()
    for ev in events:
        match ev:
            case p.Accepted():
                out.request_id = ev.request_id
            case p.Transcript():
                out.transcript.CopyFrom(transcript(ev))
            case p.ImageText():
                out.image_text.CopyFrom(image_text(ev))
            case p.Answer():
                out.answers.append(answer(ev))
            case p.NoAnswer():
                out.no_answer.CopyFrom(no_answer(ev))
            case p.Clarify():
                out.clarify.CopyFrom(clarify(ev))
            case p.NotHeard():
                out.not_heard.CopyFrom(not_heard(ev))
            case p.Done():
                out.timings.CopyFrom(timings(ev.timings))
    return out


def entry_data(e: pb.Entry) -> tuple[str, EntryData]:
    """(knowledge base, entry) of an Entry message."""
    updated = e.updated_at.seconds + e.updated_at.nanos / 1e9 if e.HasField("updated_at") else 0.0
    return e.knowledge_base or DEFAULT_KB, EntryData(
        id=e.id, answer=e.answer, title=e.title, questions=tuple(e.questions),
        tags=tuple(t for t in e.tags if t), locale=e.locale, url=e.url, updated_at=updated,
        image_count=len(e.images), body=e.body, body_format=BODY_FORMATS.get(e.body_format, "?"),
    )


def entry_images(e: pb.Entry) -> list[p.ImageInput]:
    return [p.ImageInput(bytes(i.data), i.mime_type) for i in e.images]


def converse_message(m: pb.ConverseRequest) -> p.ConverseMessage:
    kind = m.WhichOneof("request")
    if kind == "config":
        c = m.config
        return p.ConverseStart(
            request=ask_request(c.question, None),
            format=AUDIO_FORMATS.get(c.format, "?") or "pcm16",
            sample_rate_hz=c.sample_rate_hz,
            channels=c.channels,
            end_silence_ms=c.end_silence_ms,
            whole_call=c.whole_call,
        )
    if kind == "audio_chunk":
        return bytes(m.audio_chunk)
    return p.EndOfUtterance()


def entry_message(kb: str, e: EntryData) -> pb.Entry:
    out = pb.Entry(
        knowledge_base=kb, id=e.id, title=e.title, answer=e.answer, questions=list(e.questions),
        tags=list(e.tags), locale=e.locale, url=e.url,
    )
    if e.updated_at:
        out.updated_at.FromNanoseconds(int(e.updated_at * 1e9))
    return out


def upsert_summary(r: WriteReport) -> pb.UpsertSummary:
    return pb.UpsertSummary(
        received=r.received, written=r.written, replaced=r.replaced, rows=r.rows,
        failures=[pb.EntryFailure(index=f.index, entry_id=f.entry_id, code=f.code,
                                  message=f.message) for f in r.rejected],
    )


def conversation_id(q: pb.Question) -> str:
    """The conversation a question belongs to (Question.metadata["conversation_id"])."""
    return q.metadata.get("conversation_id", "")


VERDICTS = {pb.VERDICT_HELPFUL: True, pb.VERDICT_NOT_HELPFUL: False}


def feedback(r: pb.FeedbackRequest) -> Feedback:
    return Feedback(request_id=r.request_id, helpful=VERDICTS.get(r.verdict),
                    entry_id=r.entry_id, comment=r.comment, knowledge_base=r.knowledge_base)


def suggest_options(r: pb.SuggestRequest) -> SuggestOptions:
    """The request's options; 0 fields keep the defaults."""
    given = {"min_questions": r.min_questions, "max_suggestions": r.max_suggestions}
    return SuggestOptions(**{k: v for k, v in given.items() if v})


SUGGESTION_KINDS = {PARAPHRASES: pb.SUGGESTION_KIND_PARAPHRASES,
                    NEW_ENTRY: pb.SUGGESTION_KIND_NEW_ENTRY}


def suggestion(s: Suggestion) -> pb.Suggestion:
    return pb.Suggestion(
        id=s.id, kind=SUGGESTION_KINDS[s.kind], entry_id=s.entry_id,
        questions=list(s.questions), asked=s.asked, score=s.score, reason=s.reason,
        nearest_entry_id=s.nearest_entry, blocked=s.blocked, request_ids=list(s.request_ids))


def lint_reply(r: LintReport) -> pb.LintReply:
    return pb.LintReply(
        entries=r.entries, rows=r.rows,
        confusable=[pb.ConfusablePair(
            entry_id_a=p.entry_a, entry_id_b=p.entry_b, similarity=p.similarity,
            text_a=p.text_a, text_b=p.text_b, text_similarity=p.text_similarity)
            for p in r.confusable],
        misplaced=[pb.MisplacedParaphrase(
            entry_id=m.entry_id, paraphrase=m.paraphrase, own_score=m.own_score,
            other_entry_id=m.other_entry, other_score=m.other_score) for m in r.misplaced],
    )
