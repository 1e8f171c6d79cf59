"""End to end through the real server, client, Milvus Lite and MiniLM: text questions."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from supportqa.client import SupportQAError
from supportqa.v1 import supportqa_pb2 as pb

pytestmark = pytest.mark.slow

# Questions worded differently from every text of the sample KB -> the entry that answers them.
PARAPHRASES = [
    ("someone nicked my debit card out of my bag", "card-stolen"),
    ("i forgot the pin number for my card, how can i get a new one", "card-pin-reset"),
    ("how do i get rid of my account with you for good", "account-close"),
    ("my friend says the money i transferred on monday never showed up", "transfer-not-arrived"),
    ("can I put cash aside in separate little savings goals", "savings-pots"),
    (
        "app keeps saying Error 4012 card declined by issuer when I pay",
        "error-4012-card-declined-by-issuer",
    ),
    ("what does ERR_TOPUP_LIMIT mean, I can't add money", "error-topup-limit"),
]


@pytest.mark.parametrize(("text", "entry_id"), PARAPHRASES)
async def test_paraphrase_ranks_right_entry_first(client, text, entry_id):
    result = await client.ask(text)
    assert not result.HasField("no_answer"), result.no_answer.reason
    assert result.answers[0].entry_id == entry_id, [a.entry_id for a in result.answers]
    assert result.answers[0].rank == 1
    assert pb.ROUTE_DENSE in result.answers[0].routes
    scores = [a.score for a in result.answers]
    assert scores[0] >= result.answers[0].score >= 0.5


async def test_stream_event_order(client):
    kinds = []
    async for ev in client.ask_stream("my card was stolen", top_k=3):
        kinds.append(type(ev).__name__)
        if isinstance(ev, pb.Done):
            assert ev.timings.total_us >= ev.timings.embed_us > 0
            assert ev.timings.search_us > 0
    assert kinds[0] == "Accepted"
    assert kinds[-1] == "Done"
    assert set(kinds[1:-1]) == {"Answer"}
    assert 1 <= len(kinds) - 2 <= 3


async def test_off_topic_question_gets_no_answer(client):
    result = await client.ask("what is the boiling point of tungsten in kelvin")
    assert result.HasField("no_answer")
    assert not result.answers
    assert result.no_answer.best_score < result.no_answer.threshold
    assert "threshold" in result.no_answer.reason


async def test_min_score_override(client):
    low = await client.ask("what is the boiling point of tungsten in kelvin", min_score=0.0)
    assert len(low.answers) == 5


async def test_upsert_replace_leaves_no_stale_match(client):
    kb = "replace_test"
    old = pb.Entry(
        knowledge_base=kb,
        id="e1",
        title="Parking permits",
        answer="Apply at the town hall.",
        questions=["how do I get a parking permit for my street"],
    )
    other = pb.Entry(
        knowledge_base=kb,
        id="e2",
        title="Library cards",
        answer="Ask at any library.",
        questions=["how do I join the library"],
    )
    s = await client.upsert([old, other])
    assert (s.written, s.replaced) == (2, 0)
    first = await client.ask("parking permit for my road", knowledge_base=kb)
    assert first.answers[0].entry_id == "e1"

    new = pb.Entry(
        knowledge_base=kb,
        id="e1",
        title="Recycling bins",
        answer="Bins are collected on Tuesdays.",
        questions=["which day are the recycling bins emptied"],
    )
    s = await client.upsert([new])
    assert (s.written, s.replaced) == (1, 1)
    stale = await client.ask(
        "how do I get a parking permit for my street", knowledge_base=kb, min_score=0.0, top_k=5
    )
    for a in stale.answers:
        assert "parking" not in a.matched_text.lower()
        assert "town hall" not in a.answer
    fresh = await client.ask("when do they empty the recycling", knowledge_base=kb)
    assert fresh.answers[0].entry_id == "e1"
    assert fresh.answers[0].answer == "Bins are collected on Tuesdays."
    got = await client.get("e1", knowledge_base=kb)
    assert got.title == "Recycling bins"
    stats = await client.stats(kb)
    assert stats.knowledge_bases[0].entries == 2


async def test_entry_head_trains_after_writes_and_is_dropped_by_the_next(client):
    from supportqa_tools.evaluation import wait_for_head

    kb = "head_test"
    families = {
        "bins": ["when are the bins collected", "what day is rubbish collection",
                 "my recycling was not picked up"],
        "parking": ["how do i get a parking permit", "where can residents park",
                    "i got a parking ticket outside my house"],
        "library": ["when does the library open", "can i renew my library books online",
                    "how do i join the library"],
    }
    entries = [pb.Entry(knowledge_base=kb, id=e, answer=f"About {e}.", questions=qs)
               for e, qs in families.items()]
    await client.upsert(entries[:1])
    assert await wait_for_head(client, kb) == "off"  # one entry: nothing to tell apart
    await client.upsert(entries[1:])
    assert (await client.stats(kb)).knowledge_bases[0].head == "training"
    assert await wait_for_head(client, kb) == "ready"
    got = await client.ask("the dustmen skipped my street this week", knowledge_base=kb,
                           min_score=0.0)
    assert got.answers[0].entry_id == "bins"
    # A write makes the head stale at once: answers rank without it until it is retrained.
    await client.upsert([pb.Entry(knowledge_base=kb, id="pool", answer="About the pool.",
                                  questions=["is the swimming pool open on sunday"])])
    assert (await client.stats(kb)).knowledge_bases[0].head == "training"
    got = await client.ask("can i swim there on sundays", knowledge_base=kb, min_score=0.0)
    assert got.answers[0].entry_id == "pool"
    assert await wait_for_head(client, kb) == "ready"
    got = await client.ask("can i swim there on sundays", knowledge_base=kb, min_score=0.0)
    assert got.answers[0].entry_id == "pool"
    # A write starts the retraining itself: with no question or Stats call after it, the
    # first look, once a few seconds have passed, finds the head ready.
    await client.delete(["library"], knowledge_base=kb)
    await asyncio.sleep(5)  # HEAD_SETTLE_S (1 s) + training 4 entries (milliseconds)
    assert (await client.stats(kb)).knowledge_bases[0].head == "ready"


async def test_delete(client):
    kb = "delete_test"
    await client.upsert(
        [
            pb.Entry(
                knowledge_base=kb,
                id="gone",
                answer="Soon gone.",
                questions=["is this entry still here"],
            ),
            pb.Entry(
                knowledge_base=kb,
                id="stays",
                answer="Still here.",
                questions=["what about the weather"],
            ),
        ]
    )
    d = await client.delete(["gone", "never-existed"], knowledge_base=kb)
    assert d.deleted == 1
    assert list(d.not_found) == ["never-existed"]
    r = await client.ask("is this entry still here", knowledge_base=kb, min_score=0.0)
    assert all(a.entry_id != "gone" for a in r.answers)
    with pytest.raises(SupportQAError) as e:
        await client.get("gone", knowledge_base=kb)
    assert e.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("kwargs", "code", "words"),
    [
        (dict(text=""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (dict(text="   "), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (dict(text="x" * 2001), grpc.StatusCode.INVALID_ARGUMENT, "limit is 2000"),
        (dict(text="hi", top_k=51), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        (dict(text="hi", top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        (dict(text="hi", min_score=1.5), grpc.StatusCode.INVALID_ARGUMENT, "min_score"),
        (dict(text="hi", knowledge_base="nope"), grpc.StatusCode.NOT_FOUND, "does not exist"),
        (dict(text="hi", knowledge_base="bad name!"), grpc.StatusCode.INVALID_ARGUMENT, "name"),
    ],
)
async def test_bad_questions(client, kwargs, code, words):
    with pytest.raises(SupportQAError) as e:
        await client.ask(**kwargs)
    assert e.value.code == code
    assert words in e.value.details


async def test_bad_upsert_keeps_earlier_entries_and_names_the_bad_one(client):
    kb = "bad_upsert"
    entries = [
        pb.Entry(knowledge_base=kb, id="ok1", answer="Fine.", questions=["first question"]),
        pb.Entry(knowledge_base=kb, id="no-answer", questions=["second question"]),
        pb.Entry(knowledge_base=kb, id="ok3", answer="Never written.", questions=["third"]),
    ]
    with pytest.raises(SupportQAError) as e:
        await client.upsert(entries)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no-answer" in e.value.details and "no answer" in e.value.details
    assert e.value.summary is not None
    assert e.value.summary.written == 1
    assert e.value.summary.failures[0].entry_id == "no-answer"
    assert e.value.summary.failures[0].index == 1
    assert (await client.get("ok1", knowledge_base=kb)).answer == "Fine."
    with pytest.raises(SupportQAError):
        await client.get("ok3", knowledge_base=kb)

    with pytest.raises(SupportQAError) as e:
        await client.upsert([pb.Entry(knowledge_base=kb, answer="anonymous")])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no id" in e.value.details


async def test_tag_filters_up_to_the_limit_search_and_more_are_refused(client):
    from supportqa_server.knowledge.store import MAX_FILTER_TAGS

    # The limit must sit under what Milvus Lite accepts: a filter with MAX_FILTER_TAGS tags
    # searches for real (an over-deep filter fails inside Milvus as INTERNAL).
    tags = [f"topic{i}" for i in range(MAX_FILTER_TAGS)]
    r = await client.ask("my card was stolen", tags=tags)
    assert r.HasField("no_answer")  # no sample entry carries these tags
    with pytest.raises(SupportQAError) as e:
        await client.ask("my card was stolen", tags=tags + ["one-more"])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{MAX_FILTER_TAGS + 1} tags; the limit is {MAX_FILTER_TAGS}" in e.value.details


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (dict(id="x" * 10_000), "ids have at most 256 bytes"),
        (dict(id="é" * 200), "its id is 400 bytes"),  # 200 characters, but Milvus counts bytes
        (dict(locale="en-GB-" + "x" * 40), "locale"),
        (dict(tags=[f"tag{i}" for i in range(1000)]), "1000 tags; the limit is 100"),
        (dict(tags=["t" * 300] * 10), "tags (10) take 3011 bytes"),
        (dict(questions=["word " * 2000]), "question of 9999 bytes"),  # stripped
    ],
)
async def test_entries_that_do_not_fit_the_fields_are_refused_before_writing(
    client, fields, words
):
    """Milvus Lite would store these, a Milvus cluster would fail them at insert: both get the
    same INVALID_ARGUMENT, with a message short enough for gRPC's metadata."""
    kb = "unfit"
    entry = dict(knowledge_base=kb, id="unfit-entry", answer="An answer.", questions=["q"])
    ok = pb.Entry(knowledge_base=kb, id="fits", answer="Fine.", questions=["a question"])
    with pytest.raises(SupportQAError) as e:
        await client.upsert([ok, pb.Entry(**(entry | fields))])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in e.value.details and "entry #1" in e.value.details
    assert len(e.value.details) < 500
    assert e.value.summary.written == 1 and e.value.summary.failures[0].index == 1
    assert len(e.value.summary.failures[0].entry_id) <= 256
    with pytest.raises(SupportQAError) as e:
        await client.get(fields.get("id", "unfit-entry")[:256], knowledge_base=kb)
    assert e.value.code == grpc.StatusCode.NOT_FOUND


async def test_voice_and_image_unimplemented_on_text_server(client):
    for kwargs in (dict(audio=b"RIFF....", audio_format="wav"), dict(image=b"\x89PNG")):
        with pytest.raises(SupportQAError) as e:
            await client.ask(**kwargs)
        assert e.value.code == grpc.StatusCode.UNIMPLEMENTED


async def test_health_serving_and_reflection(text_server):
    async with grpc.aio.insecure_channel(text_server) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="supportqa.v1.Answering")
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def one():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for r in stub.ServerReflectionInfo(one()):
            names = {s.name for s in r.list_services_response.service}
            assert {"supportqa.v1.Answering", "supportqa.v1.Knowledge"} <= names


async def test_cli_ask_against_server(text_server, capsys):
    from supportqa.cli import main

    # The blocking CLI runs in a thread: the server shares this test's event loop.
    args = ["--target", text_server, "ask", "I think somebody stole my card"]
    assert await asyncio.to_thread(main, args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("1. [")
    assert "(card-stolen;" in out.splitlines()[0]


async def test_cli_ingest_and_stats(text_server, tmp_path, capsys):
    from supportqa.cli import main

    kb = tmp_path / "kb.jsonl"
    kb.write_text(
        '{"id": "a", "answer": "Yes.", "questions": ["do you open on sundays"]}\n'
        '{"id": "b", "answer": "No.", "questions": ["do you sell gift cards"]}\n'
    )
    assert (
        await asyncio.to_thread(main, ["--target", text_server, "ingest", str(kb), "-k", "cli_kb"])
        == 0
    )
    assert "written 2" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["--target", text_server, "stats", "-k", "cli_kb"]) == 0
    assert "cli_kb: 2 entries" in capsys.readouterr().out


async def test_cli_output_cut_short_by_a_pipe_ends_quietly(text_server, monkeypatch):
    """`supportqa ask ... | head -1`: the reader has gone when the CLI writes."""
    import os
    import sys

    from supportqa import cli

    read_end, write_end = os.pipe()

    class GoneReader:
        def write(self, _text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return write_end

    monkeypatch.setattr(sys, "stdout", GoneReader())
    try:
        argv = ["--target", text_server, "ask", "my card was stolen"]
        assert await asyncio.to_thread(cli.main, argv) == 1  # no exception escapes
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_cli_ask_prints_ranked_answers_and_an_honest_no_answer(text_server, capsys):
    import asyncio

    from supportqa import cli

    argv = ["--target", text_server, "ask"]
    assert await asyncio.to_thread(cli.main, [*argv, "my card was stolen"]) == 0
    assert "1. [" in capsys.readouterr().out
    assert await asyncio.to_thread(cli.main, [*argv, "the boiling point of tungsten"]) == 0
    out = capsys.readouterr().out
    assert out.count("no confident answer") == 1 and "threshold" in out, out


async def test_a_dry_run_upsert_reports_every_bad_entry_and_writes_nothing(client):
    entries = [
        pb.Entry(knowledge_base="dry", id="ok", answer="Fine.", questions=["q"]),
        pb.Entry(knowledge_base="dry", id="no-answer"),
        pb.Entry(knowledge_base="dry", id="x" * 300, answer="Too long an id."),
        pb.Entry(knowledge_base="bad name", id="y", answer="Bad knowledge base."),
    ]
    s = await client.upsert(entries, dry_run=True)
    assert (s.received, s.written, s.rows) == (4, 0, 0)
    assert [f.index for f in s.failures] == [1, 2, 3]
    assert "has no answer" in s.failures[0].message
    assert "ids have at most 256 bytes" in s.failures[1].message
    with pytest.raises(SupportQAError) as e:
        await client.stats("dry")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


async def test_cli_ingest_of_a_file_with_a_bad_line_writes_nothing(client, text_server, tmp_path,
                                                                  capsys):
    """The README's own command (target after the subcommand): a file with one entry the
    server would refuse and one repeated id is reported line by line, and nothing is written."""
    from supportqa.cli import main

    kb = tmp_path / "kb.jsonl"
    lines = [json.dumps({"id": f"e{i}", "answer": f"Answer {i}."}) for i in range(5)]
    lines[2] = json.dumps({"id": "e2", "answer": "x", "locale": "l" * 40})  # line 3
    lines.append(json.dumps({"id": "e0", "answer": "again"}))  # line 6
    kb.write_text("\n".join(lines) + "\n")
    argv = ["ingest", str(kb), "-k", "cli_bad", "--target", text_server]
    assert await asyncio.to_thread(main, argv) == 1
    err = capsys.readouterr().err
    assert f"{kb}:3: entry #2 (id 'e2'): locale" in err
    assert f"{kb}:6: id 'e0' is already used on line 1" in err
    assert "nothing written" in err
    with pytest.raises(SupportQAError) as e:
        await client.stats("cli_bad")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
