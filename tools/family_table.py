"""Write README.md's model-family coverage table from tests/data/family_coverage.json.

The record is written by the full family sweep (``FASTMAX_FAMILY_SWEEP=full pytest
tests/test_families.py``); this tool renders it as the markdown between the README's markers
``<!-- family-coverage:start -->`` and ``<!-- family-coverage:end -->``. Needs no GPU.

    python tools/family_table.py            # print the table
    python tools/family_table.py --write    # replace the README's table with it
    python tools/family_table.py --check    # exit 1 if the README's table differs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "data" / "family_coverage.json"
README = ROOT / "README.md"
START, END = "<!-- family-coverage:start -->", "<!-- family-coverage:end -->"

# status -> what the table says it means, in the table's order
MEANING = {
    "state": "forward, generation equal to recomputation, constant-size `FastmaxCache`",
    "state (fix)": "refused as configured; as `state` after the config change the error names",
    "growing cache": "forward and exact generation, but transformers' key/value cache (the reason is in "
                     "`fastmax_hf.integration.KV_CACHE_FAMILIES`)",
    "refused": "`from_config` / `from_pretrained` raise `FastmaxUnsupportedError` naming the family",
    "no attention layers": "no attention to convert (the `FastmaxCache` holds the family's own states)",
    "own constant-size cache": "exact generation with a cache of the family's own that does not grow",
    "not built": "the tiny test model does not build or run offline with `eager` either (not a fastmax outcome)",
}


def _entry(family: str, result: dict) -> str:
    status = result["status"]
    if status == "state (fix)":
        change = ", ".join(f"{name}={value!r}" for name, value in result["fix"].items())
        return f"{family} ({change})"
    if status == "refused":
        return f"{family} ({result['reason']})"
    return family


def render(record: dict) -> str:
    """The markdown table (with its heading line) for a coverage record."""
    by_status: dict[str, list[str]] = {}
    for family, result in record["families"].items():
        by_status.setdefault(result["status"], []).append(_entry(family, result))
    unknown = sorted(set(by_status) - set(MEANING))
    if unknown:
        raise ValueError(f"statuses without a meaning in tools/family_table.py: {unknown}")
    lines = [
        f"Tiny models of all {len(record['families'])} causal-LM families of transformers {record['transformers']} "
        "(`tests/test_families.py`, written by `tools/family_table.py`):",
        "",
        "| status | meaning | families |",
        "|---|---|---|",
    ]
    for status, meaning in MEANING.items():
        if status in by_status:
            entries = by_status[status]
            lines.append(f"| {status} ({len(entries)}) | {meaning} | {', '.join(entries)} |")
    return "\n".join(lines) + "\n"


def section(readme: str) -> str:
    """What the README holds between the markers."""
    if START not in readme or END not in readme:
        raise ValueError(f"README.md has no {START} ... {END} section")
    return readme.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def replace_section(readme: str, table: str) -> str:
    head, rest = readme.split(START, 1)
    return head + START + "\n" + table + END + rest.split(END, 1)[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="replace README.md's table")
    action.add_argument("--check", action="store_true", help="exit 1 if README.md's table differs")
    args = parser.parse_args(argv)
    table = render(json.loads(RECORD.read_text()))
    readme = README.read_text()
    if args.write:
        README.write_text(replace_section(readme, table))
    elif args.check:
        if section(readme) != table:
            print("README.md's family table is stale: run python tools/family_table.py --write", file=sys.stderr)
            return 1
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
