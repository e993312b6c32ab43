#!/usr/bin/env python3
"""Generate the feature x backend status tables from conformance results.

Reads docs/conformance/<backend>.json (written by `domkit conformance --json`) and rewrites
the table between the STATUS-TABLE markers in README.md and the RESULTS markers in
docs/conformance.md. Never written by hand: run this after a conformance run.

Usage: scripts/status-table.py [--check]   (--check: exit 1 if the files are out of date)
"""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKENDS = ["qemu", "libxl"]
MARK = {"pass": "pass", "fail": "FAIL", "unsupported": "unsupported"}


def load():
    results = {}
    for b in BACKENDS:
        p = ROOT / "docs" / "conformance" / f"{b}.json"
        if p.exists():
            results[b] = json.loads(p.read_text())
    return results


def table(results, detail):
    names = []
    for r in results.values():
        for s in r["report"]["scenarios"]:
            if s["name"] not in names:
                names.append(s["name"])
    cols = [b for b in BACKENDS if b in results]
    head = "| scenario | " + " | ".join(cols) + " |"
    sep = "|---" * (len(cols) + 1) + "|"
    lines = [head, sep]
    for n in names:
        cells = []
        for b in cols:
            s = next((s for s in results[b]["report"]["scenarios"] if s["name"] == n), None)
            if s is None:
                cells.append("not run")
                continue
            cell = MARK[s["verdict"]]
            if detail and s["verdict"] != "pass" and s["detail"]:
                cell += ": " + s["detail"].replace("|", "\\|")[:160]
            elif detail:
                cell += f" ({s['seconds']:.0f} s)"
            cells.append(cell)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    totals = []
    for b in cols:
        sc = results[b]["report"]["scenarios"]
        c = {v: sum(1 for s in sc if s["verdict"] == v) for v in MARK}
        totals.append(f"{c['pass']} pass, {c['fail']} fail, {c['unsupported']} unsupported")
    lines.append("| **total** | " + " | ".join(totals) + " |")
    return "\n".join(lines) + "\n"


def provenance(results):
    out = []
    for b, r in results.items():
        out.append(f"- `{b}`: `{r.get('command', '?')}` on {r.get('date', '?')} ({r.get('host', '?')})")
    return "\n".join(out) + "\n"


def splice(path, begin, end, body):
    text = path.read_text()
    a = text.index(begin) + len(begin)
    b = text.index(end)
    return text[:a] + "\n" + body + text[b:]


def main():
    results = load()
    if not results:
        print("no docs/conformance/*.json yet: run `domkit conformance --json` first")
        return 0
    changes = {
        ROOT / "README.md": splice(ROOT / "README.md", "<!-- STATUS-TABLE -->", "<!-- /STATUS-TABLE -->",
                                   table(results, False) + "\n" + provenance(results)),
        ROOT / "docs" / "conformance.md": splice(ROOT / "docs" / "conformance.md", "<!-- RESULTS -->",
                                                 "<!-- /RESULTS -->", table(results, True) + "\n" + provenance(results)),
    }
    stale = [p for p, t in changes.items() if p.read_text() != t]
    if "--check" in sys.argv:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run scripts/status-table.py")
        return 1 if stale else 0
    for p, t in changes.items():
        p.write_text(t)
    print("updated: " + ", ".join(str(p.relative_to(ROOT)) for p in changes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
