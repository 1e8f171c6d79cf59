"""Writes the README's configuration table from `Settings` (the one source of defaults).

Usage: python scripts/gen_settings_doc.py [--check]   (--check: exit 1 if README differs)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if isinstance(value, Path):
        text = str(value).replace(str(Path.home()), "~")
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, int) and value >= 2**20 and value % 2**20 == 0:
        return f"`{value}` ({value // 2**20} MiB)"
    elif value in ("", [], {}):
        return "empty"
    else:
        text = str(value)
    return f"`{text}`"


def table() -> str:
    """The configuration table, one row per setting, in the order Settings declares them."""
    from supportqa_server.runtime.settings import Settings

    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `SUPPORTQA_{name.upper()}` | {_default(field)} | {meaning} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    """The README with its table between the markers replaced by the generated one."""
    head, sep, rest = readme.partition(START)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if README.md is out of date")
    args = ap.parse_args()
    old = README.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md's configuration table is out of date: run "
                  "python scripts/gen_settings_doc.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
