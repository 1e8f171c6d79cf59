"""Offline encoder adaptation: contrastive fine-tuning on a knowledge base's own paraphrases.

Each batch holds a few paraphrases of each of several entries (label-aware, so an entry never
meets itself as a negative); the loss pulls an entry's paraphrases together and pushes other
entries' apart (supervised contrastive loss, Khosla et al. 2020; with two paraphrases per entry
it is the symmetric multiple-negatives ranking loss). The result is a model directory that
``SUPPORTQA_TEXT_MODEL=DIR`` loads. Only knowledge-base texts are used, never queries.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPORT_FILE = "adapt.json"  # written beside the weights: options, fingerprint, cost, losses


@dataclasses.dataclass(frozen=True)
class AdaptOptions:
    """How the encoder is fine-tuned."""

    epochs: int = 1  # passes over every paraphrase
    batch_entries: int = 64  # distinct entries per batch (their paraphrases are the negatives)
    per_entry: int = 2  # paraphrases of each entry per batch (>= 2: they are the positives)
    lr: float = 1e-4  # peak AdamW learning rate
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of the steps with a linear warm-up, then linear decay to 0
    temperature: float = 0.05  # softmax temperature over cosines (MNRL's scale 20)
    max_tokens: int = 64  # paraphrases are short; longer ones are truncated for training only
    freeze_embeddings: bool = True  # keep the word-piece table: rare words stay where they were
    seed: int = 13
    grad_chunk: int = 16  # texts in the autograd graph at once (0: whole batch); memory, not maths

    def check(self) -> None:
        """Raises ValueError naming the first unusable option."""
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_entries < 2:
            raise ValueError(f"batch_entries must be at least 2, got {self.batch_entries}")
        if self.per_entry < 2:
            raise ValueError(f"per_entry must be at least 2 (a paraphrase needs a positive), "
                             f"got {self.per_entry}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 < self.temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {self.temperature}")
        if self.grad_chunk < 0:
            raise ValueError(f"grad_chunk must be 0 (whole batch) or more, got {self.grad_chunk}")


@dataclasses.dataclass
class AdaptReport:
    """What one adaptation did and cost."""

    out_dir: str
    base_model: str
    fingerprint: str  # of the texts, options and base model; equal means reusable
    entries: int  # entries with at least two texts (the others cannot be trained on)
    texts: int
    steps: int
    seconds: float  # wall time of the training loop and the save
    peak_rss_mb: float  # of the whole process, at the end
    losses: list[float]  # mean loss per epoch
    reused: bool = False  # an earlier run with the same fingerprint was kept


def fingerprint(groups: Sequence[Sequence[str]], options: AdaptOptions, base_model: str) -> str:
    """A digest of everything that determines the adapted weights."""
    h = hashlib.sha256()
    h.update(base_model.encode())
    h.update(json.dumps(dataclasses.asdict(options), sort_keys=True).encode())
    for g in groups:
        h.update(b"\x1e" + "\x1f".join(g).encode())
    return h.hexdigest()[:16]


def label_aware_batches(
    groups: Sequence[Sequence[str]], batch_entries: int, per_entry: int, rng: random.Random
) -> list[list[tuple[int, str]]]:
    """One epoch of batches of (entry index, text), each entry at most once per batch.

    An entry's texts are shuffled and cut into chunks of ``per_entry`` (a last chunk of one
    joins the chunk before it); each batch draws chunks of ``batch_entries`` distinct entries,
    entries with more chunks left being likelier, so every text is seen once per epoch. Chunks
    left when fewer than two entries remain are dropped (a batch needs negatives).
    """
    chunks: dict[int, list[list[str]]] = {}
    for i, texts in enumerate(groups):
        t = list(texts)
        if len(t) < 2:
            continue
        rng.shuffle(t)
        cut = [t[j : j + per_entry] for j in range(0, len(t), per_entry)]
        if len(cut[-1]) == 1:
            cut[-2].extend(cut.pop())
        chunks[i] = cut
    batches = []
    while len(chunks) >= 2:
        labels = list(chunks)
        weights = [len(chunks[i]) for i in labels]
        chosen: list[int] = []
        for _ in range(min(batch_entries, len(labels))):
            # Weighted draw without replacement (Efraimidis-Spirakis keys would do the same).
            total = sum(w for lab, w in zip(labels, weights, strict=True) if lab not in chosen)
            x = rng.random() * total
            for lab, w in zip(labels, weights, strict=True):
                if lab in chosen:
                    continue
                x -= w
                if x <= 0:
                    chosen.append(lab)
                    break
            else:
                chosen.append(next(lab for lab in labels if lab not in chosen))
        batch = []
        for lab in chosen:
            batch.extend((lab, t) for t in chunks[lab].pop())
            if not chunks[lab]:
                del chunks[lab]
        batches.append(batch)
    return batches


def supervised_contrastive_loss(z, labels, temperature: float):
    """Mean over anchors of -log p(positive) averaged over the anchor's positives.

    Args:
        z: (B, H) unit vectors.
        labels: (B,) entry indices.
        temperature: Softmax temperature over cosines.
    """
    import torch

    sim = z @ z.T / temperature  # (B, B)
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_p = sim - torch.logsumexp(sim, dim=1, keepdim=True)  # (B, B)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask  # (B, B)
    has_pos = pos.any(1)
    per_anchor = -(log_p.masked_fill(~pos, 0.0).sum(1)[has_pos] / pos.sum(1)[has_pos])
    return per_anchor.mean()


def _embed(model, enc):
    """Mean-pooled unit vectors (B, H) of one tokenised chunk, as the server's encoder pools."""
    import torch
    from supportqa_server.runtime.encoder import mean_pool

    pooled = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
    return torch.nn.functional.normalize(pooled, dim=-1)


def contrastive_backward(model, chunks, labels, temperature: float) -> float:
    """Accumulates the batch's contrastive-loss gradients in ``model``; returns the loss.

    With one chunk this is a plain forward and backward. With several, only one chunk's
    activations are held at a time (gradient caching, Gao et al. 2021): every chunk's vectors
    are computed without a graph, the loss's gradient with respect to those vectors is taken,
    then each chunk is run again with its graph and back-propagates its share. The gradients
    are the batch's own, since each rerun restores the random state its first run drew
    dropout from. It costs one extra forward pass. Adapting on BANKING77 (128 texts a batch)
    on 2 cores, chunks of 16 took mpnet's peak RSS from 15 GB to 3.5 GB in the same time
    (868 s against 844-894 s), and MiniLM's from 3.5 GB to 1.2 GB in 7% more time.
    """
    import torch

    if len(chunks) == 1:
        loss = supervised_contrastive_loss(_embed(model, chunks[0]), labels, temperature)
        loss.backward()
        return loss.item()
    devices = [] if labels.device.type == "cpu" else [labels.device]
    states, vectors = [], []
    with torch.no_grad():
        for enc in chunks:
            states.append(_rng_state(devices))
            vectors.append(_embed(model, enc))
    z = torch.cat(vectors).requires_grad_()
    loss = supervised_contrastive_loss(z, labels, temperature)
    loss.backward()
    # The last rerun leaves the random state where the first pass left it.
    for enc, state, grad in zip(chunks, states, z.grad.split([len(v) for v in vectors]),
                                strict=True):
        _set_rng_state(devices, state)
        _embed(model, enc).backward(grad)
    return loss.item()


def _rng_state(devices) -> list:
    import torch

    return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) if d.type == "cuda"
                                      else torch.mps.get_rng_state() for d in devices]


def _set_rng_state(devices, state: list) -> None:
    import torch

    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1:], strict=True):
        if d.type == "cuda":
            torch.cuda.set_rng_state(s, d)
        else:
            torch.mps.set_rng_state(s)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def adapt(
    groups: Sequence[Sequence[str]],
    out_dir: str | Path,
    *,
    base_model: str = "",
    options: AdaptOptions = AdaptOptions(),
    device: str = "cpu",
    reuse: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    cache_dir: Path | None = None,
) -> AdaptReport:
    """Fine-tunes the text encoder on entries' paraphrases and saves it.

    Args:
        groups: Per entry, its texts (title and paraphrases); entries with fewer than two
            texts are left out (they have no positive).
        out_dir: Where the model, tokenizer and ``adapt.json`` go; created if needed.
        base_model: Model to start from, as SUPPORTQA_TEXT_MODEL names it (text_models.py);
            empty means the bundled MiniLM.
        options: Training options.
        device: torch device.
        reuse: Keep out_dir as it is when its ``adapt.json`` has the same fingerprint.
        log: Receives a progress line now and then.
        cache_dir: Where a packaged base model is extracted; default the server's.

    Returns:
        The report, also written to ``out_dir/adapt.json``.

    Raises:
        ValueError: An option is unusable or fewer than two entries have two texts.
    """
    import torch
    from supportqa_server.runtime.text_models import resolve_text_model
    from transformers import AutoModel, AutoTokenizer

    options.check()
    base = resolve_text_model(base_model, cache_dir)
    out = Path(out_dir)
    fp = fingerprint(groups, options, base)
    report_path = out / REPORT_FILE
    if reuse and report_path.is_file():
        old = json.loads(report_path.read_text(encoding="utf-8"))
        if old.get("fingerprint") == fp:
            log(f"adapt: {out} already holds this adaptation ({fp}); reusing it")
            fields = {f.name for f in dataclasses.fields(AdaptReport)}
            return AdaptReport(**{k: v for k, v in old.items() if k in fields} | {"reused": True})
    trainable = [g for g in groups if len(g) >= 2]
    if len(trainable) < 2:
        raise ValueError(
            "adaptation needs at least two entries with two or more texts (title or paraphrases)"
        )
    t_start = time.perf_counter()
    rng = random.Random(options.seed)
    torch.manual_seed(options.seed)
    local = Path(base).exists()
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=local)
    model = AutoModel.from_pretrained(base, local_files_only=local).to(device)
    model.train()
    if options.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and LayerNorm gains
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": options.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=options.lr,
    )
    epoch_batches = [
        label_aware_batches(trainable, options.batch_entries, options.per_entry, rng)
        for _ in range(options.epochs)
    ]
    total = sum(map(len, epoch_batches))
    warm = max(1, int(options.warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)),
    )
    losses = []
    step = 0
    for epoch, batches in enumerate(epoch_batches):
        running = 0.0
        for batch in batches:
            labels = torch.tensor([lab for lab, _ in batch], device=device)
            texts = [t for _, t in batch]
            size = options.grad_chunk or len(texts)
            chunks = [tokenizer(texts[i:i + size], padding=True, truncation=True,
                                max_length=options.max_tokens, return_tensors="pt").to(device)
                      for i in range(0, len(texts), size)]
            optimizer.zero_grad(set_to_none=True)
            loss = contrastive_backward(model, chunks, labels, options.temperature)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            running += loss
            step += 1
            if step % 50 == 0 or step == total:
                log(f"adapt: epoch {epoch + 1}/{options.epochs} step {step}/{total} "
                    f"loss {running / (step - sum(map(len, epoch_batches[:epoch]))):.4f} "
                    f"{time.perf_counter() - t_start:.0f} s")
        losses.append(running / max(1, len(batches)))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = AdaptReport(
        out_dir=str(out), base_model=base, fingerprint=fp, entries=len(trainable),
        texts=sum(map(len, trainable)), steps=total,
        seconds=round(time.perf_counter() - t_start, 1), peak_rss_mb=round(_peak_rss_mb(), 1),
        losses=[round(x, 4) for x in losses],
    )
    payload = dataclasses.asdict(report) | {"options": dataclasses.asdict(options)}
    payload.pop("reused")
    report_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return report


def kb_groups(
    kb: str | Path,
    *,
    kb_splits: Sequence[str] = (),
    queries: str | Path | None = None,
    queries_splits: Sequence[str] = (),
    dev_fraction: float = 0.2,
    seed: int = 13,
    no_answer_label: str | None = None,
) -> list[list[str]]:
    """Per entry, its texts (title, then paraphrases) as ``supportqa-server eval`` builds them.

    A JSON Lines knowledge file (knowledge/README.md) gives its entries as they are. A CSV or
    CLINC150-style JSON file goes through the eval harness's own split: when the queries come
    from the same file and splits (the default), the same ``dev_fraction`` of each label is
    held back with the same ``seed`` and never seen here.
    """
    kb = Path(kb)
    if kb.suffix.lower() == ".jsonl":
        from supportqa.knowledge_file import read_entries

        return [[e.title, *e.questions] if e.title else list(e.questions)
                for e in read_entries(kb)]
    from supportqa_tools.datasets import build_dataset, build_entries, read_examples

    kb_examples = read_examples(kb, list(kb_splits), split_flag="--kb-split")
    q_path = Path(queries) if queries else kb
    q_splits = list(queries_splits) or (list(kb_splits) if q_path.resolve() == kb.resolve()
                                        else [])
    same_source = q_path.resolve() == kb.resolve() and sorted(kb_splits) == sorted(q_splits)
    dataset = build_dataset(kb_examples, (), same_source=same_source,
                            no_answer_label=no_answer_label, dev_fraction=dev_fraction, seed=seed)
    return [[e.title, *e.questions] for e in build_entries(dataset.kb, "adapt")]


def add_adapt_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the flags of ``supportqa-server adapt``; the data flags mean what they mean in eval."""
    d = AdaptOptions()
    parser.add_argument("--kb", required=True, metavar="FILE",
                        help="knowledge file (.jsonl), or CSV / CLINC150-style JSON as for eval")
    parser.add_argument("--kb-split", action="append", default=[], metavar="SPLIT")
    parser.add_argument("--queries", metavar="FILE",
                        help="the eval --queries file: decides whether a dev share is held back")
    parser.add_argument("--queries-split", action="append", default=[], metavar="SPLIT")
    parser.add_argument("--dev-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=13, help="seed of the eval split")
    parser.add_argument("--no-answer-label", metavar="LABEL")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the model goes")
    parser.add_argument("--base-model", default="",
                        help="start from (a path, hub id or all-mpnet-base-v2); default the "
                        "bundled MiniLM")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--batch-entries", type=int, default=d.batch_entries)
    parser.add_argument("--per-entry", type=int, default=d.per_entry)
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--grad-chunk", type=int, default=d.grad_chunk,
                        help="texts back-propagated at once (same gradients, less memory); "
                        "0 = the whole batch (mpnet: 15 GB on BANKING77 against 3.5 GB)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--force", action="store_true", help="retrain even if --out matches")


def options_from_args(args: argparse.Namespace) -> AdaptOptions:
    return AdaptOptions(epochs=args.epochs, lr=args.lr, batch_entries=args.batch_entries,
                        per_entry=args.per_entry, temperature=args.temperature,
                        grad_chunk=args.grad_chunk)


def adapt_main(args: argparse.Namespace) -> int:
    """Runs ``supportqa-server adapt``; returns the exit code."""
    from supportqa_tools.datasets import EvalInputError

    try:
        groups = kb_groups(args.kb, kb_splits=args.kb_split, queries=args.queries,
                           queries_splits=args.queries_split, dev_fraction=args.dev_fraction,
                           seed=args.seed, no_answer_label=args.no_answer_label)
        report = adapt(groups, args.out, base_model=args.base_model,
                       options=options_from_args(args), device=args.device,
                       reuse=not args.force)
    except (EvalInputError, ValueError) as e:
        print(f"supportqa-server adapt: error: {e}", file=sys.stderr)
        return 2
    print(f"adapted on {report.entries} entries, {report.texts} texts, {report.steps} steps in "
          f"{report.seconds:g} s, peak RSS {report.peak_rss_mb:.0f} MB; losses {report.losses}"
          + (" (reused)" if report.reused else ""))
    print(f"serve it with SUPPORTQA_TEXT_MODEL={Path(args.out).resolve()}")
    return 0

