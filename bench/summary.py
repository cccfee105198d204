"""What `bench/gpu_check.sh` brings back: a few small files in OUT and a short summary printed last.

    python -m cornpipe.bench.summary SCRATCH OUT [--device cuda] [--no-gpu REASON] [--elapsed SECONDS]

Reads what the steps left in SCRATCH (steps.tsv, machine.json, data/shards/manifest.json,
run/metrics.jsonl and run/config.json, bench_train.json, bench_loaders.json, pytest.xml, logs/) and
writes OUT_FILES into OUT -- nothing else, each well under the 16 MiB a file may be when it comes back
from a GPU machine. The summary printed last (machine, versions, each step's status, each figure with
its unit and its ratio to the baseline measured in the same run) is at most SUMMARY_MAX_CHARS.
"""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

OUT_FILES = ("summary.json", "steps.tsv", "bench_train.json", "bench_loaders.json", "run_metrics.jsonl",
             "pytest.xml", "log_tail.txt")
MAX_FILE_BYTES = 4 * 1024**2  # a copied file larger than this is cut (logs: the tail is kept)
LOG_TAIL_BYTES = 2 * 1024**2  # log_tail.txt
SUMMARY_MAX_CHARS = 4000


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(scratch: Path) -> list[dict[str, Any]]:
    steps = []
    try:
        lines = (scratch / "steps.tsv").read_text().splitlines()
    except OSError:
        return steps
    for line in lines:
        name, status, seconds, note = (line.split("\t") + ["", "", ""])[:4]
        steps.append({"step": name, "status": status, "seconds": int(seconds) if seconds.isdigit() else None,
                      "note": note})
    return steps


# ---------------------------------------------------------------------------------------------
# figures: what each step measured, as plain numbers with their units


def pytest_counts(path: Path) -> dict[str, int] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return n


# one line per test as `pytest -v` runs it: "tests/a.py::test_b[x y] PASSED   [ 40%]"
PYTEST_LINE = re.compile(r"^(\S+\.py::.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def pytest_counts_from_log(path: Path) -> dict[str, Any] | None:
    """What a pytest killed before its junit file had run: the per-test lines of its `-v` log."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    seen: dict[str, str] = {}
    for line in text.splitlines():
        m = PYTEST_LINE.match(line)
        if m:
            seen[m.group(1)] = m.group(2)  # a test's teardown ERROR follows its PASSED: the last word wins
    if not seen:
        return None
    words = list(seen.values())
    n: dict[str, Any] = {"tests": len(words), "passed": words.count("PASSED") + words.count("XPASS"),
                         "failures": words.count("FAILED"), "errors": words.count("ERROR"),
                         "skipped": words.count("SKIPPED") + words.count("XFAIL"), "partial": True}
    n["failed_tests"] = [t for t, w in seen.items() if w in ("FAILED", "ERROR")]
    return n


def data_figures(scratch: Path) -> dict[str, Any] | None:
    manifest = _load(scratch / "data" / "shards" / "manifest.json")
    if not manifest:
        return None
    per_split = manifest.get("counts", {}).get("per_split", {})
    return {"train_images": per_split.get("train"), "val_images": per_split.get("val"),
            "max_resolution_px": manifest.get("params", {}).get("max_resolution")}


def run_figures(scratch: Path) -> dict[str, Any] | None:
    try:
        lines = [json.loads(x) for x in (scratch / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return None
    if not lines:
        return None
    config = _load(scratch / "run" / "config.json") or {}
    last = lines[-1]
    train, val = last.get("train", {}), last.get("val", {})
    return {
        "model": config.get("model"), "image_size_px": config.get("image_size"),
        "batch_size": config.get("batch_size"), "loader": config.get("loader"), "device": config.get("device"),
        "compile": config.get("compile"), "amp": config.get("amp"), "channels_last": config.get("channels_last"),
        "epochs": len(lines),
        "epoch_s": [round(r.get("time_s", 0.0), 2) for r in lines],  # the first includes compilation
        "train_images_per_s": train.get("images_per_s"),  # last epoch
        "train_data_wait_share": train.get("data_wait_share"),
        "val_position_accuracy": val.get("position_accuracy"), "val_grade_mae": val.get("grade_mae"),
        "val_loss": val.get("loss"),
    }


TRAIN_KEYS = ("variant", "data", "device", "amp", "channels_last", "compile", "images_per_s", "images_per_s_min",
              "images_per_s_max", "ratio_vs_eager", "step_ms", "compile_s", "first_steps_s",
              "gpu_peak_mem_mb", "peak_rss_mb", "tf32", "error")
LOADER_KEYS = ("backend", "mode", "device", "images_per_s", "images_per_s_min", "images_per_s_max",
               "ratio_vs_torch", "peer", "ratio_vs_peer", "fraction_of_ceiling", "peak_rss_mb", "setup", "error")


def bench_figures(scratch: Path, name: str, keys: tuple[str, ...]) -> dict[str, Any] | None:
    data = _load(scratch / name)
    if not data:
        return None
    out = {"config": data.get("config"),
           "results": [{k: r.get(k) for k in keys if k in r} for r in data.get("results", [])]}
    if "host_only" in data:
        out["host_only"] = data["host_only"]
    if data.get("ceiling"):
        out["ceiling"] = {k: data["ceiling"].get(k) for k in ("images_per_s", "workers", "decoder")
                          if k in data["ceiling"]}
    return out


def figures(scratch: Path) -> dict[str, Any]:
    return {"data": data_figures(scratch), "train-run": run_figures(scratch),
            "bench-train": bench_figures(scratch, "bench_train.json", TRAIN_KEYS),
            "bench-loaders": bench_figures(scratch, "bench_loaders.json", LOADER_KEYS),
            "pytest-gpu": (pytest_counts(scratch / "pytest.xml")
                           or pytest_counts_from_log(scratch / "logs" / "pytest-gpu.log"))}


# ---------------------------------------------------------------------------------------------
# the printed summary


def _n(value: Any, digits: int = 0) -> str:
    return "?" if value is None else f"{value:,.{digits}f}"


def machine_line(machine: dict[str, Any] | None, no_gpu: str | None) -> str:
    if not machine:
        return "machine: unknown (machine.json missing)"
    libs = machine.get("libraries") or {}
    gpu = machine.get("gpu")
    if gpu:
        card = (f"{gpu['name']} x{gpu['count']} ({gpu['memory_gb']} GiB, sm {gpu['capability']}); "
                f"torch {libs.get('torch')}, CUDA {gpu.get('cuda')}, cuDNN {gpu.get('cudnn')}")
    else:
        card = f"no CUDA GPU ({no_gpu or 'none found'}); torch {libs.get('torch')}"
    return (f"{card}; {machine.get('cores')} cores {machine.get('cpu_model')}, {machine.get('memory_gb')} GiB; "
            f"python {machine.get('python')}; {machine.get('date_utc')}")


def _step_detail(name: str, fig: Any) -> list[str]:
    """The figures of one step, as indented lines (empty when the step left none)."""
    if not fig:
        return []
    if name == "data":
        return [f"    {_n(fig['train_images'])} train / {_n(fig['val_images'])} val images, "
                f"tar shards at {_n(fig['max_resolution_px'])} px"]
    if name == "train-run":
        flags = "+".join(f for f, on in (("compile", fig["compile"]), (str(fig["amp"]), fig["amp"] != "off"),
                                         ("channels_last", fig["channels_last"])) if on) or "eager fp32"
        share = fig["train_data_wait_share"]
        return [f"    {fig['model']} {fig['image_size_px']} px b{fig['batch_size']} {flags}, {fig['loader']} loader "
                f"on {fig['device']}: {fig['epochs']} epoch(s), epoch times {', '.join(map(str, fig['epoch_s']))} s",
                f"    last epoch: train {_n(fig['train_images_per_s'])} img/s, data wait "
                f"{_n(None if share is None else 100 * share, 1)} %; val position accuracy "
                f"{_n(fig['val_position_accuracy'], 3)}, grade MAE {_n(fig['val_grade_mae'], 2)} grade units"]
    if name == "bench-train":
        cfg = fig.get("config") or {}
        lines = [f"    {cfg.get('model')} {cfg.get('image_size')} px b{cfg.get('batch_size')} on {cfg.get('device')}"
                 f" (ratios to eager-fp32 of this run):"]
        for r in fig["results"]:
            if r.get("error"):
                lines.append(f"      {r['variant']:<14} {r.get('data', '')}: failed: {r['error'][:160]}")
                continue
            ratio = "—" if r.get("ratio_vs_eager") is None else f"{r['ratio_vs_eager']:.2f}× eager-fp32"
            text = (f"      {r['variant']:<14} {_n(r['images_per_s']):>8} img/s  {ratio}  "
                    f"step {_n(r.get('step_ms'), 1)} ms")
            if r.get("compile_s") is not None:
                text += f", compile {_n(r['compile_s'])} s"
            if r.get("gpu_peak_mem_mb") is not None:
                text += f", GPU peak {_n(r['gpu_peak_mem_mb'])} MB"
            lines.append(text)
        return lines
    if name == "bench-loaders":
        cfg = fig.get("config") or {}
        host = ", host-only: uint8 crops, not normalised" if fig.get("host_only") else ""
        lines = [f"    {cfg.get('image_size')} px b{cfg.get('batch_size')} on {cfg.get('device')}{host} "
                 f"(ratios to the torch loader of this run):"]
        for r in fig["results"]:
            if r.get("error"):
                lines.append(f"      {r['backend']:<14} failed: {r['error'][:160]}")
                continue
            ratio = "—" if r.get("ratio_vs_torch") is None else f"{r['ratio_vs_torch']:.2f}× torch"
            if r.get("ratio_vs_peer") is not None:
                ratio += f", {r['ratio_vs_peer']:.2f}× {r.get('peer')}"
            name = r["backend"] if r.get("mode") != "folder" else f"{r['backend']}-folder"
            lines.append(f"      {name:<14} {_n(r['images_per_s']):>8} img/s  {ratio}, "
                         f"peak RSS {_n(r.get('peak_rss_mb'))} MB")
        ceiling = fig.get("ceiling") or {}
        if ceiling.get("images_per_s"):
            lines.append(f"      decode ceiling  {_n(ceiling['images_per_s']):>7} img/s (CPU, "
                         f"{ceiling.get('workers')} processes)")
        return lines
    if name == "pytest-gpu":
        counts = f"    {fig['passed']} passed, {fig['failures'] + fig['errors']} failed, {fig['skipped']} skipped"
        if not fig.get("partial"):
            return [counts]
        return [counts + " before the step ended (no junit file: counted from its log)",
                *(f"      failed: {t}" for t in fig["failed_tests"])]
    return []


def fit(lines: list[str], limit: int) -> list[str]:
    """At most `limit` characters in all (newlines included): long lines cut, then figure lines dropped
    from the end (step lines, the machine line and the RESULT line go last)."""
    lines = [line if len(line) <= 240 else line[:239] + "…" for line in lines]
    dropped = 0
    while len(lines) > 2 and sum(len(x) + 1 for x in lines) + 40 > limit:
        details = [i for i in range(1, len(lines) - 1) if lines[i].startswith("    ")]
        lines.pop(details[-1] if details else -2)
        dropped += 1
    if dropped:
        lines.insert(-1, f"[{dropped} line(s) left out: see summary.json]")
    return lines


def summary_lines(steps: list[dict[str, Any]], figs: dict[str, Any], machine: dict[str, Any] | None,
                  no_gpu: str | None, elapsed: float | None, out_note: str) -> list[str]:
    title = "GPU check summary" + (" (no CUDA GPU: CPU smoke run, no GPU numbers)" if no_gpu else "")
    lines = [f"{title}: " + machine_line(machine, no_gpu), f"{'step':<14} {'status':<19} {'s':>4}  note"]
    for s in steps:
        lines.append(f"{s['step']:<14} {s['status']:<19} {_n(s['seconds']):>4}  {s['note'][:150]}".rstrip())
        lines.extend(_step_detail(s["step"], figs.get(s["step"])))
    lines.append(out_note)
    bad = [s["step"] for s in steps if s["status"] != "ok"]
    took = f" in {elapsed:.0f} s" if elapsed is not None else ""
    if not steps:
        lines.append(f"RESULT: no step ran{took}")
    elif bad:
        lines.append(f"RESULT: {len(bad)} of {len(steps)} steps not ok{took}: {', '.join(bad)}")
    else:
        lines.append(f"RESULT: all {len(steps)} steps ok{took}" + (" (CPU smoke run)" if no_gpu else ""))
    return fit(lines, SUMMARY_MAX_CHARS)


# ---------------------------------------------------------------------------------------------
# OUT: a few small files


def _copy_capped(src: Path, dst: Path) -> str | None:
    """Copy src to dst, keeping at most MAX_FILE_BYTES (the head); None when src is missing."""
    if not src.is_file():
        return None
    if src.stat().st_size <= MAX_FILE_BYTES:
        shutil.copyfile(src, dst)
        return "copied"
    with src.open("rb") as f:
        dst.write_bytes(f.read(MAX_FILE_BYTES))
    return f"cut to {MAX_FILE_BYTES} of {src.stat().st_size} bytes"


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(line[:400] for line in text)


def log_tail(scratch: Path, steps: list[dict[str, Any]]) -> str:
    """The last lines of each step's log (more for a step that is not ok, and its children's logs)."""
    logs, parts = scratch / "logs", []
    for extra in ("imports", "machine"):
        text = _tail(logs / f"{extra}.log", 20)
        if text.strip():
            parts.append(f"==> {extra}.log (last 20 lines)\n{text}")
    for s in steps:
        ok = s["status"] == "ok"
        n = 40 if ok else 300
        parts.append(f"==> {s['step']}.log: {s['status']} (last {n} lines)\n{_tail(logs / (s['step'] + '.log'), n)}")
        if not ok and (logs / s["step"]).is_dir():  # the benchmarks' isolated children
            for child in sorted((logs / s["step"]).glob("*.log")):
                parts.append(f"==> {s['step']}/{child.name} (last 60 lines)\n{_tail(child, 60)}")
    text = "\n\n".join(parts) + "\n"
    data = text.encode()
    if len(data) > LOG_TAIL_BYTES:
        text = "[... cut ...]\n" + data[-LOG_TAIL_BYTES:].decode(errors="replace")
    return text


def write_out(scratch: Path, out: Path, steps: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, str]:
    """Fill OUT with OUT_FILES (only those); what happened to each, for summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:  # a previous check's files never mix with this one's
        (out / name).unlink(missing_ok=True)
    sources = {"steps.tsv": scratch / "steps.tsv", "bench_train.json": scratch / "bench_train.json",
               "bench_loaders.json": scratch / "bench_loaders.json",
               "run_metrics.jsonl": scratch / "run" / "metrics.jsonl", "pytest.xml": scratch / "pytest.xml"}
    files = {}
    for name, src in sources.items():
        files[name] = _copy_capped(src, out / name) or "missing"
    (out / "log_tail.txt").write_text(log_tail(scratch, steps))
    files["log_tail.txt"] = "written"
    files["summary.json"] = "written"
    summary["out_files"] = files
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return files


def main(scratch: Path, out: Path, device: str, no_gpu: str | None, elapsed: float | None) -> list[str]:
    """Write OUT's files, print the summary (last line: RESULT ...); returns the printed lines."""
    steps = read_steps(scratch)
    figs = figures(scratch)
    machine = _load(scratch / "machine.json")
    summary = {"device": device, "no_gpu": no_gpu, "elapsed_s": elapsed, "machine": machine,
               "steps": steps, "figures": figs}
    files = write_out(scratch, out, steps, summary)
    present = [n for n in OUT_FILES if (out / n).is_file()]
    size = sum((out / n).stat().st_size for n in present)
    missing = [n for n, how in files.items() if how == "missing"]
    out_note = (f"OUT {out}: {len(present)} files, {size / 1024:,.0f} kB"
                + (f" (missing: {', '.join(missing)})" if missing else ""))
    lines = summary_lines(steps, figs, machine, no_gpu, elapsed, out_note)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":  # a script of gpu_check.sh, not a user command: argparse, no click
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cornpipe.bench.summary")
    parser.add_argument("scratch", type=Path, help="The check's scratch folder (steps.tsv, logs, results).")
    parser.add_argument("out", type=Path, help="Where the few files that come back go.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-gpu", dest="no_gpu", default=None,
                        help="Why there is no GPU (the CUDA steps ran as CPU smoke runs).")
    parser.add_argument("--elapsed", type=float, default=None)
    args = parser.parse_args()
    if not args.scratch.is_dir():
        parser.error(f"{args.scratch} is not a folder")
    main(args.scratch, args.out, args.device, args.no_gpu, args.elapsed)
