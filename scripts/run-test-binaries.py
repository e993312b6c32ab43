#!/usr/bin/env python3
"""Run the test executables a `cargo test --no-run --message-format=json` build produced,
one after the other, as `cargo test` would (cwd = the package's directory), without cargo.

Why: `cargo test` holds the target directory's lock while the tests run, so nothing else can
build meanwhile; scripts/test.sh runs the Xen side (which builds its payload with cargo) in
parallel with the QEMU side's tests.

Usage: run-test-binaries.py BUILD.json [-- TEST-ARGS...]
Prints each binary's libtest output (with its `test result:` line, which scripts/test.sh
counts); exits 1 if any binary failed, after running all of them (like --no-fail-fast).
"""
import json
import os
import subprocess
import sys
import time


def executables(build_json):
    seen = set()
    with open(build_json) as f:
        for line in f:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("reason") != "compiler-artifact":
                continue
            exe = msg.get("executable")
            if not exe or not msg.get("profile", {}).get("test"):
                continue
            if exe in seen:
                continue
            seen.add(exe)
            target = msg["target"]
            yield exe, os.path.dirname(msg["manifest_path"]), target["name"], target["kind"]


def main():
    argv = sys.argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    build_json, rest = argv[0], argv[1:]
    test_args = rest[1:] if rest[:1] == ["--"] else rest
    failed = []
    for exe, cwd, name, kind in executables(build_json):
        print(f"\n     Running {name} ({'/'.join(kind)}): {exe}", flush=True)
        started = time.monotonic()
        rc = subprocess.call([exe, *test_args], cwd=cwd)
        print(f"     {name}: exit {rc} in {time.monotonic() - started:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"error: test binaries failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
