"""Run every ``bench/bench_*.py`` and record the results in ``docs/benchmarks.md``.

Each benchmark runs in its own process (so one cannot warm up or slow down the
next); its printed tables go into the results block of ``docs/benchmarks.md``
together with the machine line. ``make bench`` calls this.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/run_all.py [--no-write] [NAME ...]``
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results -->", "<!-- /results -->"

sys.path.insert(0, str(HERE))
from _common import WIDTH, machine_line  # noqa: E402


def title_of(script: Path) -> str:
    doc = ast.get_docstring(ast.parse(script.read_text())) or script.stem
    return doc.strip().splitlines()[0].rstrip(".")


def run(script: Path) -> tuple[str, float, int]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS=str(WIDTH),
               TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, text=True,
                          capture_output=True, check=False)
    took = time.perf_counter() - start
    out = proc.stdout.rstrip()
    if proc.returncode:
        out += f"\n\n[exit code {proc.returncode}]\n" + proc.stderr[-3000:]
    return out, took, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these (e.g. bench_cache)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    # bench_real (the MiniLM job at full size, ~25 min) runs on its own: make bench-real
    scripts = sorted(s for s in HERE.glob("bench_*.py") if s.name != "bench_real.py")
    if args.names:
        scripts = [s for s in scripts if s.stem in args.names or s.name in args.names]
    machine = machine_line(threads=False)
    threads = os.environ.get("TFZ_BENCH_THREADS", "1")
    parts = [f"Machine: {machine}; the benchmarks use {threads} torch thread(s) "
             "(TFZ_BENCH_THREADS) unless their table says otherwise. "
             "Command: `make bench` (= `python bench/run_all.py`).", ""]
    failed = 0
    total = time.perf_counter()
    for script in scripts:
        print(f"== {script.name}", flush=True)
        out, took, rc = run(script)
        failed += rc != 0
        print(out, flush=True)
        print(f"({took:.0f} s)", flush=True)
        parts += [f"### {title_of(script)}", "",
                  f"`bench/{script.name}`, {took:.0f} s{', FAILED' if rc else ''}", "",
                  "```text", out, "```", ""]
    took_all = time.perf_counter() - total
    parts.append(f"All benchmarks: {took_all:.0f} s.")
    print(f"== all: {took_all:.0f} s, {failed} failed")
    if not args.no_write and not args.names:
        block = "\n".join([BEGIN, *parts, END])
        text = DOC.read_text() if DOC.exists() else ""
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text + ("\n" if text else "# Benchmarks\n\n") + block + "\n"
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
