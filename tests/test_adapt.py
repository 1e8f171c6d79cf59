"""Encoder adaptation on a tiny knowledge base: batches, loss, a model TextEncoder loads."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from supportqa_tools.adapt import (
    REPORT_FILE,
    AdaptOptions,
    adapt,
    kb_groups,
    label_aware_batches,
    supervised_contrastive_loss,
)

TINY_KB = [
    ["Lost card", "I lost my card", "my debit card is missing", "can't find my card anywhere",
     "I think my card was stolen", "someone took my wallet with the card"],
    ["Change PIN", "how do I change my PIN", "I want a new PIN code", "reset the PIN on my card",
     "forgot my PIN, how to set another", "update card PIN number"],
    ["Refund status", "where is my refund", "the merchant refunded me but I see nothing",
     "how long does a refund take", "refund not showing in my account", "still waiting on refund"],
    ["Top up by bank transfer", "how do I top up with a bank transfer",
     "add money from my bank account", "transfer funds in to top up",
     "can I load my account by wire", "top-up via transfer from another bank"],
]


def test_batches_hold_each_entry_once_and_cover_every_text():
    groups = [[f"e{i} t{j}" for j in range(n)] for i, n in enumerate([5, 2, 7, 1, 4])]
    batches = label_aware_batches(groups, batch_entries=3, per_entry=2, rng=random.Random(0))
    seen = []
    for batch in batches:
        labels = [lab for lab, _ in batch]
        assert len(set(labels)) >= 2  # negatives exist
        assert all(labels.count(lab) >= 2 for lab in labels)  # each text has a positive
        runs = [lab for k, lab in enumerate(labels) if k == 0 or labels[k - 1] != lab]
        assert len(runs) == len(set(runs))  # one chunk per entry per batch
        seen += [t for _, t in batch]
    assert len(seen) == len(set(seen))
    assert not any(t.startswith("e3 ") for t in seen)  # a lone text has no positive
    assert len(seen) >= 14  # at most a chunk or two left over when one entry remains


def test_contrastive_loss_prefers_clustered_embeddings():
    import torch

    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.1], [1.0, -0.1], [-0.1, 1.0], [0.1, 1.0]]), dim=-1)
    mixed = clustered[[0, 2, 1, 3]]
    good = supervised_contrastive_loss(clustered, labels, 0.05)
    bad = supervised_contrastive_loss(mixed, labels, 0.05)
    assert float(good) < 0.01 < float(bad)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="per_entry"):
        AdaptOptions(per_entry=1).check()
    with pytest.raises(ValueError, match="two entries"):
        adapt([["only", "one entry"]], "unused", options=AdaptOptions())


def _spread(vectors_by_entry: list[np.ndarray]) -> tuple[float, float]:
    """(mean cosine between paraphrases of an entry, mean cosine across entries)."""
    within, across = [], []
    for i, a in enumerate(vectors_by_entry):
        sims = a @ a.T
        within.append(sims[np.triu_indices(len(a), 1)].mean())
        for b in vectors_by_entry[i + 1:]:
            across.append((a @ b.T).mean())
    return float(np.mean(within)), float(np.mean(across))


@pytest.mark.slow
def test_adaptation_pulls_paraphrases_together_and_saves_a_loadable_model(tmp_path):
    from supportqa_server.runtime.encoder import TextEncoder

    base = TextEncoder()
    before = _spread([base.encode(g) for g in TINY_KB])
    opts = AdaptOptions(epochs=1, batch_entries=4, per_entry=3, lr=1e-4, warmup=0.0)
    report = adapt(TINY_KB, tmp_path / "model", options=opts)
    assert report.entries == 4 and report.texts == 24 and report.steps == 2
    assert report.seconds > 0 and report.peak_rss_mb > 100
    saved = json.loads((tmp_path / "model" / REPORT_FILE).read_text())
    assert saved["fingerprint"] == report.fingerprint and saved["options"]["lr"] == 1e-4

    encoder = TextEncoder(str(tmp_path / "model"))
    after = _spread([encoder.encode(g) for g in TINY_KB])
    assert after[0] > before[0]  # paraphrases of an entry closer together
    assert after[0] - after[1] > before[0] - before[1]  # and further from other entries'
    v = encoder.encode(["where is my refund"])
    assert v.shape == (1, 384) and abs(float(np.linalg.norm(v)) - 1) < 1e-5

    again = adapt(TINY_KB, tmp_path / "model", options=opts)
    assert again.reused and again.fingerprint == report.fingerprint


def test_kb_groups_keep_the_eval_dev_share_out(shared_data):
    from supportqa_tools.evaluation import build_dataset, read_examples

    path = shared_data / "text" / "banking77" / "train.csv"
    groups = kb_groups(path, dev_fraction=0.2, seed=13)
    examples = read_examples(path)
    dataset = build_dataset(examples, examples, same_source=True, dev_fraction=0.2, seed=13)
    texts = {t for g in groups for t in g[1:]}
    assert len(groups) == 77
    assert texts == {e.text for e in dataset.kb}
    asked = [q.text for q in dataset.queries]
    assert sum(t in texts for t in asked) < 0.02 * len(asked)  # only verbatim duplicates


def test_kb_groups_of_separate_query_splits_use_the_whole_kb_split(shared_data):
    path = shared_data / "text" / "clinc150" / "train_val.json"
    groups = kb_groups(path, kb_splits=["train"], queries_splits=["val", "oos_val"],
                       no_answer_label="oos")
    assert len(groups) == 150 and sum(len(g) - 1 for g in groups) == 15000


def _tiny_bert(dropout: float):
    """A randomly initialised 2-layer BERT and three tokenised chunks of two texts each."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    model = BertModel(config).train()
    lengths = [5, 3, 7, 4, 6, 2]
    ids = torch.randint(1, 60, (6, 7))
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask  # 0 is the padding id
    whole = {"input_ids": ids, "attention_mask": mask}
    chunks = [{k: v[i:i + 2] for k, v in whole.items()} for i in range(0, 6, 2)]
    return model, whole, chunks, torch.tensor([0, 0, 1, 1, 2, 2])


def _grads(model) -> list:
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


def test_chunked_backward_gives_the_whole_batch_gradients():
    import torch
    from supportqa_tools.adapt import contrastive_backward

    model, whole, chunks, labels = _tiny_bert(dropout=0.0)
    one = contrastive_backward(model, [whole], labels, 0.05)
    reference = _grads(model)
    chunked = contrastive_backward(model, chunks, labels, 0.05)
    got = _grads(model)
    assert chunked == pytest.approx(one, rel=1e-5)
    assert len(got) == len(reference) > 10
    for g, r in zip(got, reference, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_chunked_backward_reruns_each_chunk_with_its_own_dropout():
    import torch
    from supportqa_tools.adapt import _embed, contrastive_backward, supervised_contrastive_loss

    model, _, chunks, labels = _tiny_bert(dropout=0.3)
    torch.manual_seed(7)
    contrastive_backward(model, chunks, labels, 0.05)
    got = _grads(model)
    # The same dropout draws, in the same order, all in one graph.
    torch.manual_seed(7)
    z = torch.cat([_embed(model, enc) for enc in chunks])
    supervised_contrastive_loss(z, labels, 0.05).backward()
    for g, r in zip(got, _grads(model), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
