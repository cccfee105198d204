"""The summary `bench/gpu_check.sh` prints last: one row per step with its headline numbers.

    python -m bench.summary OUT [--device cuda] [--no-gpu REASON] [--elapsed SECONDS]

Reads what the steps left in OUT: steps.tsv (name, status, seconds, note), machine.json,
pytest-gpu.xml, bench_train.json, bench_train_loader.json, bench_loaders.json, run/metrics.jsonl.
Also writes OUT/summary.json.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cornpipe.bench.machine import describe


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pytest(out: Path) -> str:
    try:
        root = ET.parse(out / "pytest-gpu.xml").getroot()
    except (OSError, ET.ParseError):
        return ""
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return ""
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return f"{passed} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped"


def _each(results: list[dict[str, Any]], key: str, text: Any) -> list[str]:
    """One summary phrase per benchmark row: `text(row)`, or "<name>: failed"."""
    return [f"{r[key]}: failed" if r.get("error") else text(r) for r in results]


def _train(out: Path, name: str) -> str:
    data = _load(out / name)
    if not data:
        return ""
    synthetic = {x["variant"]: x for x in (_load(out / "bench_train.json") or {}).get("results", [])
                 if x["data"] == "synthetic" and not x.get("error")}

    def text(r: dict[str, Any]) -> str:
        line = f"{r['variant']} {r['images_per_s']:,.0f} img/s"
        if r.get("ratio_vs_eager") is not None and r["variant"] != "eager-fp32":
            line += f" ({r['ratio_vs_eager']:.2f}×)"
        if r.get("compile_s") is not None:
            line += f" [compile {r['compile_s']:.0f} s]"
        if r["data"] != "synthetic":
            line += f", data wait {100 * r['data_wait_share']:.1f} %"
            same = synthetic.get(r["variant"])
            if same:  # also counts on-device augmentation, which the host-side wait cannot see
                line += f", {r['images_per_s'] / same['images_per_s']:.2f}× synthetic"
        return line

    cfg = data["config"]
    return f"{cfg['model']} {cfg['image_size']} px b{cfg['batch_size']}: " + "; ".join(
        _each(data["results"], "variant", text))


def _loaders(out: Path) -> str:
    data = _load(out / "bench_loaders.json")
    if not data:
        return ""

    def text(r: dict[str, Any]) -> str:
        line = f"{r['backend']} {r['images_per_s']:,.0f} img/s"
        if r.get("ratio_vs_torch") is not None and r["backend"] != "torch":
            line += f" ({r['ratio_vs_torch']:.2f}× torch)"
        return line

    parts = _each(data["results"], "backend", text)
    ceiling = data.get("ceiling") or {}
    if ceiling.get("images_per_s"):
        parts.append(f"decode ceiling {ceiling['images_per_s']:,.0f} img/s")
    return "; ".join(parts)


def _run(out: Path) -> str:
    path = out / "run" / "metrics.jsonl"
    try:
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return ""
    if not lines:
        return ""
    last = lines[-1]
    train, val = last.get("train", {}), last.get("val", {})
    text = (f"{len(lines)} epoch(s); last: train {train.get('images_per_s', 0):,.0f} img/s, "
            f"data wait {100 * train.get('data_wait_share', 0):.1f} %")
    if "position_accuracy" in val:
        text += f", val position acc {val['position_accuracy']:.2f}, grade MAE {val.get('grade_mae', float('nan')):.2f}"
    return text


HEADLINES = {"pytest-gpu": _pytest, "bench-train": lambda o: _train(o, "bench_train.json"),
             "bench-train-loader": lambda o: _train(o, "bench_train_loader.json"),
             "bench-loaders": _loaders, "train-run": _run}


def read_steps(out: Path) -> list[dict[str, str]]:
    steps = []
    try:
        for line in (out / "steps.tsv").read_text().splitlines():
            name, status, seconds, note = (line.split("\t") + ["", "", ""])[:4]
            steps.append({"step": name, "status": status, "seconds": seconds, "note": note})
    except OSError:
        pass
    return steps


def main(out: Path, device: str, no_gpu: str | None, elapsed: float | None) -> None:
    """Print the summary table of gpu_check.sh's steps, write OUT/summary.json, end with a RESULT line."""
    steps = read_steps(out)
    for s in steps:
        headline = HEADLINES.get(s["step"])
        s["result"] = (headline(out) if headline and s["status"] == "ok" else "") or s["note"]
    machine = _load(out / "machine.json")
    title = "GPU check summary" + (" (no CUDA GPU: CPU smoke run, no GPU numbers)" if no_gpu else "")
    table = Table(title=title, caption=describe(machine) if machine else None)
    for name in ("step", "status", "s", "result"):
        table.add_column(name, overflow="fold")
    for s in steps:
        style = "green" if s["status"] == "ok" else ("yellow" if s["status"] == "skip" else "red")
        table.add_row(s["step"], f"[{style}]{s['status']}[/{style}]", s["seconds"], s["result"])
    Console(width=160 if not sys.stdout.isatty() else None).print(table)
    bad = [s["step"] for s in steps if s["status"] != "ok"]
    (out / "summary.json").write_text(json.dumps({"device": device, "no_gpu": no_gpu, "elapsed_s": elapsed,
                                                  "machine": machine, "steps": steps}, indent=2) + "\n")
    took = f" in {elapsed:.0f} s" if elapsed is not None else ""
    if bad:
        print(f"RESULT: {len(bad)} of {len(steps)} steps not ok{took}: {', '.join(bad)}")
    else:
        print(f"RESULT: all {len(steps)} steps ok{took}" + (" (CPU smoke run)" if no_gpu else ""))


if __name__ == "__main__":  # a script of gpu_check.sh, not a user command: argparse, no click
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cornpipe.bench.summary")
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-gpu", dest="no_gpu", default=None,
                        help="Why there is no GPU (the CUDA steps ran as CPU smoke runs).")
    parser.add_argument("--elapsed", type=float, default=None)
    args = parser.parse_args()
    if not args.out.is_dir():
        parser.error(f"{args.out} is not a folder")
    main(args.out, args.device, args.no_gpu, args.elapsed)
