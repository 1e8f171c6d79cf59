"""Labelled data sets for the offline tools: readers (CSV, JSON), splits, knowledge-base
entries built from them."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from supportqa.v1 import supportqa_pb2

LABEL_COLUMNS = ("label", "category", "intent")
TEXT_COLUMNS = ("text",)
class EvalInputError(ValueError):
    """An input file or flag is unusable; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled question from a data set."""

    text: str
    label: str



# Readers


def _decode_error(path: Path, e: UnicodeDecodeError) -> EvalInputError:
    return EvalInputError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8")


def read_csv_examples(path: str | Path) -> list[Example]:
    """Reads a CSV of labelled questions with a header row.

    The text column is ``text``; the label column is ``label``, ``category`` (BANKING77) or
    ``intent``; other columns are ignored. Header names are matched case-insensitively.

    Args:
        path: The CSV file, UTF-8 (a byte-order mark is allowed).

    Returns:
        The examples in file order.

    Raises:
        EvalInputError: The file is missing, empty, lacks a column, or has a row with an empty
            text or label or too many fields.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise EvalInputError(f"{path}: empty file; expected a header such as text,label")
            names = [h.strip().lower() for h in header]
            text_col = next((names.index(c) for c in TEXT_COLUMNS if c in names), None)
            label_col = next((names.index(c) for c in LABEL_COLUMNS if c in names), None)
            if text_col is None or label_col is None:
                missing = "text" if text_col is None else "label"
                raise EvalInputError(
                    f"{path}: no {missing} column in header {','.join(header)}; expected "
                    f"'text' and one of {', '.join(LABEL_COLUMNS)}"
                )
            examples = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) > len(header):
                    raise EvalInputError(
                        f"{path}:{reader.line_num}: {len(row)} fields but the header has "
                        f"{len(header)}; quote texts that contain commas"
                    )
                text = row[text_col].strip() if text_col < len(row) else ""
                label = row[label_col].strip() if label_col < len(row) else ""
                if not text or not label:
                    raise EvalInputError(
                        f"{path}:{reader.line_num}: empty {'text' if not text else 'label'}"
                    )
                examples.append(Example(text, label))
    except FileNotFoundError as e:
        raise EvalInputError(f"{path}: no such file") from e
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from e
    except csv.Error as e:
        raise EvalInputError(f"{path}: malformed CSV: {e}") from e
    if not examples:
        raise EvalInputError(f"{path}: header but no rows")
    return examples


def read_json_examples(
    path: str | Path, splits: Sequence[str] = (), *, split_flag: str = "--split"
) -> list[Example]:
    """Reads labelled questions from a CLINC150-style JSON file.

    The file is an object of splits, each a list of ``[text, intent]`` pairs.

    Args:
        path: The JSON file.
        splits: Splits to read, concatenated in this order; may be empty when the file holds
            a single split.
        split_flag: The command-line flag that chooses splits, named in error messages.

    Returns:
        The examples of the chosen splits.

    Raises:
        EvalInputError: The file is missing or not JSON of that shape, a split is unknown,
            or none was chosen among several.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError as e:
        raise EvalInputError(f"{path}: no such file") from e
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from e
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(data, dict) or not data:
        raise EvalInputError(
            f"{path}: expected an object of splits, each a list of [text, intent] pairs"
        )
    available = ", ".join(data)
    if not splits:
        if len(data) > 1:
            raise EvalInputError(
                f"{path}: holds several splits ({available}); choose with {split_flag}"
            )
        splits = list(data)
    examples = []
    for split in splits:
        if split not in data:
            raise EvalInputError(f"{path}: unknown split {split!r}; available: {available}")
        items = data[split]
        if not isinstance(items, list):
            raise EvalInputError(f"{path}: split {split!r} is not a list of [text, intent] pairs")
        for i, item in enumerate(items):
            if (
                not isinstance(item, list | tuple)
                or len(item) != 2
                or not all(isinstance(x, str) and x.strip() for x in item)
            ):
                raise EvalInputError(
                    f"{path}: split {split!r} item {i}: expected [text, intent] with two "
                    f"non-empty strings, got {json.dumps(item)[:80]}"
                )
            examples.append(Example(item[0].strip(), item[1].strip()))
    if not examples:
        raise EvalInputError(f"{path}: split(s) {', '.join(splits)} hold no examples")
    return examples


def read_examples(
    path: str | Path, splits: Sequence[str] = (), *, split_flag: str = "--split"
) -> list[Example]:
    """Reads labelled questions from a CSV or CLINC150-style JSON file.

    The format comes from the extension (.json, .csv); other files are sniffed (a leading
    ``{`` means JSON).

    Args:
        path: The file.
        splits: JSON splits to read; must be empty for CSV.
        split_flag: The command-line flag that chooses splits, named in error messages.

    Returns:
        The examples.

    Raises:
        EvalInputError: As in ``read_csv_examples`` and ``read_json_examples``, or splits
            were given for a CSV file.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        with path.open("rb") as f:
            suffix = (
                ".json" if f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else ".csv"
            )
    if suffix == ".json":
        return read_json_examples(path, splits, split_flag=split_flag)
    if splits:
        raise EvalInputError(f"{path}: {split_flag} applies to JSON files only; this is CSV")
    return read_csv_examples(path)


# Data set construction


def stratified_split(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Holds back a fraction of each label's examples.

    Per label with n examples, round(fraction * n) are held back, but at least one and at most
    n - 1 when n >= 2, so every label is both in the knowledge base and asked; a label with a
    single example is kept. The choice depends only on (seed, label, the label's examples in
    order), so it does not change when other labels are added.

    Args:
        examples: The examples.
        fraction: Share held back, in (0, 1).
        seed: Random seed.

    Returns:
        (kept, held_back), each in the input's order; together they are the input.

    Raises:
        ValueError: fraction is outside (0, 1).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        by_label[example.label].append(i)
    held: set[int] = set()
    for label, indices in by_label.items():
        n = len(indices)
        if n < 2:
            continue
        n_held = min(max(math.floor(fraction * n + 0.5), 1), n - 1)  # round half up
        shuffled = list(indices)
        random.Random(f"{seed}:{label}").shuffle(shuffled)
        held.update(shuffled[:n_held])
    kept = [e for i, e in enumerate(examples) if i not in held]
    return kept, [e for i, e in enumerate(examples) if i in held]


def readable_label(label: str) -> str:
    """Turns a label into a title: "card_arrival" -> "Card arrival"."""
    words = label.replace("_", " ").replace("-", " ").split()
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def build_entries(examples: Iterable[Example], knowledge_base: str) -> list[supportqa_pb2.Entry]:
    """Makes one knowledge-base entry per label, its examples' texts as the paraphrases.

    Args:
        examples: The knowledge-base examples.
        knowledge_base: Knowledge base the entries belong to.

    Returns:
        Entries sorted by label, id = label, title = ``readable_label(label)``, a placeholder
        answer, paraphrases deduplicated in first-seen order.
    """
    texts: dict[str, dict[str, None]] = defaultdict(dict)  # label -> ordered set of texts
    for example in examples:
        texts[example.label][example.text] = None
    return [
        supportqa_pb2.Entry(
            knowledge_base=knowledge_base,
            id=label,
            title=readable_label(label),
            answer=f"Answer for {label}",
            questions=list(texts[label]),
        )
        for label in sorted(texts)
    ]


@dataclasses.dataclass
class Dataset:
    """Knowledge base and queries of one evaluation."""

    kb: list[Example]  # examples that become entries
    queries: list[Example]  # examples that are asked, shuffled
    warnings: list[str]  # problems worth telling the user, not fatal


def build_dataset(
    kb_examples: Sequence[Example],
    query_examples: Sequence[Example],
    *,
    same_source: bool,
    no_answer_label: str | None = None,
    dev_fraction: float = 0.2,
    seed: int = 13,
    limit: int | None = None,
) -> Dataset:
    """Splits and filters examples into a knowledge base and queries.

    When ``same_source``, the queries are a stratified ``dev_fraction`` of each label (the
    no-answer label too; its other examples are dropped) and the knowledge base is the rest.
    Otherwise the knowledge base is every kb example and the queries every query example.
    No-answer examples never enter the knowledge base.

    Args:
        kb_examples: Examples read from the --kb file.
        query_examples: Examples read from the --queries file; ignored when same_source.
        same_source: The two were read from the same file and splits.
        no_answer_label: Label whose correct result is NoAnswer.
        dev_fraction: Share of each label held back as queries when same_source.
        seed: Seed of the split and of the query shuffle.
        limit: Keep only the first ``limit`` queries after shuffling.

    Returns:
        The data set, with warnings about labels asked but absent from the knowledge base and
        queries that appear verbatim in it.
    """
    if same_source:
        kb, queries = stratified_split(kb_examples, dev_fraction, seed)
    else:
        kb, queries = list(kb_examples), list(query_examples)
    kb = [e for e in kb if e.label != no_answer_label]
    random.Random(seed).shuffle(queries)
    if limit is not None:
        queries = queries[:limit]
    warnings = []
    kb_labels = {e.label for e in kb}
    unknown = Counter(
        e.label for e in queries if e.label not in kb_labels and e.label != no_answer_label
    )
    if unknown:
        names = ", ".join(sorted(unknown)[:5]) + (", ..." if len(unknown) > 5 else "")
        warnings.append(
            f"{sum(unknown.values())} queries have {len(unknown)} labels with no knowledge-base "
            f"entry ({names}); they count as misses"
        )
    if no_answer_label is not None and not any(e.label == no_answer_label for e in queries):
        warnings.append(f"no query has the no-answer label {no_answer_label!r}")
    kb_texts = {e.text.casefold() for e in kb}
    leaked = sum(e.text.casefold() in kb_texts for e in queries)
    if leaked:
        warnings.append(f"{leaked} queries appear verbatim in the knowledge base")
    return Dataset(kb, queries, warnings)


# Metrics
