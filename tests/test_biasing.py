"""Knowledge-base language model and its fusion into Whisper's logits (no model weights)."""

from __future__ import annotations

import math

import pytest
import torch
from supportqa_server.speech.biasing import BOS, KnowledgeBias, KnowledgeLM, TokenClasses
from whisper.tokenizer import get_tokenizer

KB_TEXTS = [
    "How do I top up my card?",
    "My top-up failed",
    "I forgot my PIN",
    "How do I change my PIN?",
    "Where can I find my PIN",
    "Is there a fee for an ATM withdrawal?",
]


@pytest.fixture(scope="module")
def classes() -> TokenClasses:
    return TokenClasses(get_tokenizer(multilingual=False))


@pytest.fixture(scope="module")
def lm(classes) -> KnowledgeLM:
    return KnowledgeLM(classes, KB_TEXTS)


def token(classes: TokenClasses, text: str) -> int:
    ids = classes.tokenizer.encode(text)
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens"
    return ids[0]


def test_classes_fold_case_and_keep_the_leading_space(classes):
    of = classes.of_token
    assert of[token(classes, " PIN")] == of[token(classes, " pin")]
    assert of[token(classes, " Card")] == of[token(classes, " card")]
    assert of[token(classes, " card")] != of[token(classes, "card")]
    assert of[classes.eot] == classes.eos


@pytest.mark.parametrize("context", [(), (BOS, BOS, 0), (1, 2, 3), (5,)])
def test_every_context_is_a_distribution(lm, classes, context):
    p = lm.log_probs(context).double().exp()
    assert p.shape == (classes.n_classes,)
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-6)
    assert float(p.min()) > 0  # words the KB never uses stay reachable


def test_in_domain_words_score_higher(lm, classes):
    assert lm.score("how do I change my PIN") > lm.score("how do I change my bin") + 1.0
    assert lm.score("I forgot my pin") > lm.score("I forgot my bim")
    seq = classes.encode("I forgot my")
    after_my = lm.log_probs(seq)
    pin, bin_ = (classes.of_token[token(classes, w)] for w in (" PIN", " bin"))
    assert after_my[pin] > after_my[bin_] + 2.0


def test_texts_without_tokens_are_skipped(classes):
    assert KnowledgeLM(classes, ["", "   ", "PIN"]).n_texts == 1


def test_fusion_reranks_text_tokens_and_leaves_eot_alone(lm, classes):
    tok = classes.tokenizer
    prefix = list(tok.sot_sequence_including_notimestamps)
    made = tok.encode(" I forgot my")
    tokens = torch.tensor([prefix + made, prefix + made])
    n_vocab = classes.eot + 10  # a few specials past eot, as Whisper's vocabulary has
    logits = torch.zeros(2, n_vocab)
    pin, bin_ = token(classes, " PIN"), token(classes, " bin")
    logits[:, pin] = 3.0
    logits[:, bin_] = 3.5  # Whisper's acoustic favourite
    logits[:, classes.eot] = 1.0
    before = logits.clone()
    KnowledgeBias([lm, None], weight=0.5, sample_begin=len(prefix)).apply(logits, tokens)
    assert int(logits[0].argmax()) == pin  # the KB's word wins the close call
    assert int(logits[1].argmax()) == bin_  # a row without a model is untouched
    assert torch.equal(logits[1], before[1])
    # eot and the specials keep Whisper's logits; text tokens keep their total mass.
    assert torch.equal(logits[0, classes.eot :], before[0, classes.eot :])
    text_mass = torch.logsumexp(logits[0, : classes.eot], 0)
    assert math.isclose(float(text_mass), float(torch.logsumexp(before[0, : classes.eot], 0)),
                        rel_tol=1e-5)


def test_fusion_maps_beams_to_their_clip(lm, classes):
    tok = classes.tokenizer
    prefix = list(tok.sot_sequence_including_notimestamps)
    tokens = torch.tensor([prefix] * 4)
    logits = torch.zeros(4, classes.eot + 1)
    KnowledgeBias([None, lm], weight=1.0, sample_begin=len(prefix), beams=2).apply(
        logits, tokens)
    assert torch.count_nonzero(logits[:2]) == 0  # clip 0's two beams: no model
    assert torch.count_nonzero(logits[2:]) > 0


def test_loop_detector_counts_repeated_runs():
    from supportqa_server.speech.decoding import repeats as _repeats

    tok = get_tokenizer(multilingual=False)
    assert _repeats(tok.encode(" I don't know how to do it," * 3))
    assert not _repeats(tok.encode(" I don't know how to do it," * 2))
    assert not _repeats(tok.encode(" How do I top up my card, and how long does a top up take?"))


def test_every_row_fused_in_place_equals_the_row_gathering_path(lm, classes):
    """The fused rows come out bit for bit the same whether or not the batch also holds a
    row without a model."""
    tok = classes.tokenizer
    prefix = list(tok.sot_sequence_including_notimestamps)
    made = [tok.encode(" I forgot my"), tok.encode(" how do I top"), tok.encode(" my")]
    width = max(len(m) for m in made)
    tokens = torch.tensor([prefix + [tok.eot] * (width - len(m)) + m for m in made])
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, classes.eot + 10, generator=gen) * 3
    every = logits.clone()
    KnowledgeBias([lm, lm, lm], weight=0.3, sample_begin=len(prefix)).apply(every, tokens)
    padded_tokens = torch.cat([tokens, tokens[:1]])
    some = torch.cat([logits, logits[:1]])
    KnowledgeBias([lm, lm, lm, None], weight=0.3, sample_begin=len(prefix)).apply(
        some, padded_tokens)
    assert torch.equal(every, some[:3])
    assert not torch.equal(every, logits)


def test_fusion_equals_dense_fusion_over_every_text_token(lm, classes):
    """Moving only the KB's tokens gives what adding weight * log P_kb to all ~50k text
    tokens and restoring their mass gives, suppressed (-inf) tokens included."""
    tok = classes.tokenizer
    prefix = list(tok.sot_sequence_including_notimestamps)
    made = [tok.encode(" I forgot my"), tok.encode(" how do I top"), [], tok.encode(" xyzzy")]
    width = max(len(m) for m in made)
    tokens = torch.tensor([prefix + [tok.eot] * (width - len(m)) + m for m in made])
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, classes.eot + 10, generator=gen) * 3
    pin = token(classes, " PIN")
    logits[1, pin] = -math.inf  # suppressed by an earlier filter
    eot = classes.eot
    expected = logits.clone()
    for row, m in enumerate(made):
        lp = lm.log_probs([int(classes.of_token[t]) for t in m]).double()
        text = expected[row, :eot].double()
        fused = text + 0.3 * lp[torch.from_numpy(classes.of_token[:eot])]
        expected[row, :eot] = (fused + torch.logsumexp(text, 0) - torch.logsumexp(fused, 0)).float()
    got = logits.clone()
    KnowledgeBias([lm] * 4, weight=0.3, sample_begin=len(prefix)).apply(got, tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert got[1, pin] == -math.inf
    assert torch.equal(got[:, eot:], logits[:, eot:])
    assert not torch.equal(got[0, :eot], logits[0, :eot])
