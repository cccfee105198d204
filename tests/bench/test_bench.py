"""bench: the loader and training-step benchmarks, the decode ceiling, and the prepared GPU check.

Tiny data, 32 px, a tiny model and short windows: these tests check what the harness reports and
that it reports it from what really happened, not how fast anything is."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import cli_run as invoke
from conftest import installed

from cornpipe.bench.ceiling import decode_ceiling
from cornpipe.bench.isolate import run_isolated
from cornpipe.bench.loader_bench import SAME_WORK
from cornpipe.bench.machine import machine_facts
from cornpipe.bench.summary import OUT_FILES, SUMMARY_MAX_CHARS
from cornpipe.bench.summary import main as write_summary
from cornpipe.errors import BenchError
from cornpipe.loaders.base import AugmentConfig

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# Pretend FFCV and DALI are not installed, as on the bare GPU machine gpu_check.sh is written for.
NO_FFCV_DALI = textwrap.dedent("""
    import sys

    class _Missing:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "ffcv" or name == "nvidia.dali" or name.startswith("nvidia.dali."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _Missing())
""")


# ---------------------------------------------------------------------------------------------
# bench loaders


def test_bench_loaders_reports_ratios_and_the_class_mix_each_backend_delivered(tiny_shards, tmp_path):
    out = tmp_path / "loaders.json"
    result = invoke("bench", "loaders", tiny_shards, "--backends", "torch,resident", "--device", "cpu",
                    "--image-size", 32, "--batch-size", 8, "--workers", 1, "--epochs", 2, "--warmup-batches", 1,
                    "--repeats", 1, "--oversample", "balanced", "--no-ceiling", "--json", out)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    rows = {r["backend"]: r for r in summary["results"]}
    assert set(rows) == {"torch", "resident"}
    for row in rows.values():
        assert {"backend", "mode", "device", "images_per_s", "images_per_s_min", "images_per_s_max",
                "ratio_vs_torch", "fraction_of_ceiling", "peak_rss_mb"} <= set(row)
        assert row["mode"] == "jpg" and row["device"] == "cpu"
        assert row["images_per_s"] > 0 and row["peak_rss_mb"] > 50  # a Python process with torch
        assert row["fraction_of_ceiling"] is None  # --no-ceiling
        # balanced oversampling: each position class about a third of the 2 timed epochs
        fractions = row["class_fractions"]
        assert len(fractions) == 3 and sum(fractions) == pytest.approx(1.0)
        assert all(abs(f - 1 / 3) < 0.15 for f in fractions), fractions
    for row in rows.values():  # the figure is the round it measured (--repeats 1), not a constant
        assert len(row["repeats"]) == 1 and row["images_per_s"] == row["repeats"][0]
        assert row["images_per_s_min"] == row["images_per_s_max"] == row["images_per_s"]
    assert rows["resident"]["ratio_vs_torch"] == pytest.approx(
        rows["resident"]["images_per_s"] / rows["torch"]["images_per_s"])
    assert summary["machine"]["cores"] >= 1 and summary["machine"]["libraries"]["torch"]
    assert len(summary["dataset_class_fractions"]) == 3
    assert "resident" in result.output and "× torch" in result.output


def test_bench_loaders_errors_are_one_line(tiny_shards, tmp_path):
    result = invoke("bench", "loaders", tiny_shards, "--backends", "torch,nope")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == \
        "Error: unknown backend nope; choose from ffcv, dali, torch, resident"
    empty = tmp_path / "not-shards"
    empty.mkdir()
    result = invoke("bench", "loaders", empty, "--backends", "torch")
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "manifest.json" in last
    if not torch.cuda.is_available():
        result = invoke("bench", "loaders", tiny_shards, "--backends", "torch", "--device", "cuda")
        assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("Error: ")


PEER_BACKENDS = [
    pytest.param("ffcv", "ffcv-native", marks=pytest.mark.skipif(not installed("ffcv"), reason="no ffcv")),
    pytest.param("dali", "dali-native",
                 marks=pytest.mark.skipif(not installed("nvidia.dali"), reason="no DALI")),
    ("torch", "torchvision"),
]


# slow: every backend and peer library in an isolated process, a cold FFCV import each; make test runs it
@pytest.mark.slow
@pytest.mark.parametrize(("backend", "peer"), PEER_BACKENDS)
def test_bench_loaders_compares_each_backend_with_its_own_library(tiny_shards, tmp_path, backend, peer):
    out = tmp_path / "peers.json"
    result = invoke("bench", "loaders", tiny_shards, "--backends", backend, "--device", "cpu", "--image-size", 32,
                    "--batch-size", 8, "--workers", 1, "--seconds", 0.5, "--warmup-batches", 1, "--repeats", 1,
                    "--no-ceiling", "--json", out)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    rows = {r["backend"]: r for r in summary["results"]}
    assert set(rows) == {backend, peer}
    assert rows[peer]["images_per_s"] > 0 and rows[peer]["batch_shape"] == [8, 3, 32, 32]
    assert rows[peer]["dtype"] == "float32"
    assert rows[backend]["peer"] == peer
    assert rows[backend]["ratio_vs_peer"] == pytest.approx(rows[backend]["images_per_s"] / rows[peer]["images_per_s"])
    assert rows[peer]["ratio_vs_peer"] is None
    assert "× peer" in result.output
    # --work same (the default): the backend did the peer's work, no vertical flip, rot90 or colour jitter
    assert summary["work"] == "same"
    assert rows[backend]["augment"] == dict(asdict(SAME_WORK), scale=list(SAME_WORK.scale),
                                            ratio=list(SAME_WORK.ratio))
    assert rows[backend]["augment"]["hflip"] and not rows[backend]["augment"]["vflip"]
    assert rows[backend]["augment"]["brightness"] == 0


def test_bench_loaders_skips_a_peer_whose_library_is_missing(tiny_shards, tmp_path, monkeypatch):
    from cornpipe.bench import loader_bench

    real = loader_bench.backend_missing
    monkeypatch.setattr(loader_bench, "backend_missing",
                        lambda name: "torchvision is not installed" if name == "torchvision" else real(name))
    out = tmp_path / "full.json"
    result = invoke("bench", "loaders", tiny_shards, "--backends", "torch", "--device", "cpu", "--image-size", 32,
                    "--batch-size", 8, "--workers", 1, "--seconds", 0.5, "--warmup-batches", 1, "--repeats", 1,
                    "--no-ceiling", "--work", "full", "--json", out)
    assert result.exit_code == 0, result.output
    assert "skipped peer torchvision: torchvision is not installed" in result.output.splitlines()
    summary = json.loads(out.read_text())
    [row] = summary["results"]
    assert row["backend"] == "torch" and row["images_per_s"] > 0 and row["ratio_vs_peer"] is None
    # --work full: cornpipe's default augmentation
    assert summary["work"] == "full"
    default = AugmentConfig()
    assert row["augment"]["vflip"] == default.vflip and row["augment"]["brightness"] == default.brightness


# slow: every backend and peer library in an isolated process, a cold FFCV import each; make test runs it
@pytest.mark.slow
def test_bench_loaders_work_both_times_what_the_augmentation_costs_in_the_same_rounds(tiny_shards, tmp_path):
    """--work both: each backend once with the peers' work and once with cornpipe's own augmentation,
    in every round, and the ratio of the two; the peer runs once, with the peers' work."""
    out = tmp_path / "both.json"
    result = invoke("bench", "loaders", tiny_shards, "--backends", "torch", "--device", "cpu", "--image-size", 32,
                    "--batch-size", 8, "--workers", 1, "--seconds", 0.5, "--warmup-batches", 1, "--repeats", 2,
                    "--no-ceiling", "--work", "both", "--json", out)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["work"] == "both"
    rows = {(r["backend"], r["work"]): r for r in summary["results"]}
    assert set(rows) <= {("torch", "same"), ("torch", "full"), ("torchvision", "same")}
    same, full = rows["torch", "same"], rows["torch", "full"]
    assert len(same["repeats"]) == len(full["repeats"]) == 2
    assert same["augment"]["brightness"] == 0 and not same["augment"]["vflip"]
    assert full["augment"]["brightness"] == AugmentConfig().brightness and full["augment"]["vflip"]
    rounds = [f / s for f, s in zip(full["repeats"], same["repeats"], strict=True)]  # round by round
    assert full["full_vs_same_rounds"] == pytest.approx(rounds)
    assert full["full_vs_same"] == pytest.approx(sum(rounds) / 2)  # the median of two
    assert same["full_vs_same"] is None
    assert same["ratio_vs_torch"] == pytest.approx(1.0)  # the baseline is the same-work row
    assert "full ÷ same" in result.output and "torch (full)" in result.output


def test_the_before_baseline_reads_a_survey_described_by_a_manifest_csv(synth_raw, tiny_shards, tmp_path):
    """--manifest CSV: the team's 'before' pipeline over images that are not in the 9-folder layout."""
    import csv
    import shutil

    flat = tmp_path / "survey"  # one flat folder, labels only in the CSV (paths relative to it)
    flat.mkdir()
    rows = [("path", "position", "grade")]
    for labels in sorted(synth_raw.glob("*/labels.csv")):
        position = {"l": "lower", "m": "middle", "t": "upper"}[labels.parent.name[-1]]
        with open(labels, newline="") as f:
            for r in csv.DictReader(f):
                name = f"{labels.parent.name}_{r['file']}"
                shutil.copy(labels.parent / r["file"], flat / name)
                rows.append((name, position, r["grade"]))
    manifest = flat / "survey.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "before.json"
    result = invoke("bench", "loaders", tiny_shards, "--backends", "torch", "--manifest", manifest, "--no-peers",
                    "--device", "cpu", "--image-size", 32, "--batch-size", 8, "--workers", 1, "--seconds", 0.5,
                    "--warmup-batches", 1, "--repeats", 1, "--no-ceiling", "--json", out)
    assert result.exit_code == 0, result.output
    before = [r for r in json.loads(out.read_text())["results"] if r["mode"] == "folder"]
    assert len(before) == 1 and before[0]["images_per_s"] > 0 and before[0]["source"] == str(manifest)
    both = invoke("bench", "loaders", tiny_shards, "--source", synth_raw, "--manifest", manifest)
    assert both.exit_code == 2 and "give --source FOLDER or --manifest CSV, not both" in both.output


def test_decode_ceiling_decodes_the_shard_jpegs_on_every_worker(tiny_shards):
    result = decode_ceiling(str(tiny_shards), "train", workers=2, seconds=0.3)
    assert result["workers"] == 2 and result["images"] > 0 and result["images_per_s"] > 0
    assert result["libjpeg_turbo"] is True  # Pillow's wheels ship libjpeg-turbo
    with pytest.raises(Exception, match="unknown decoder"):
        decode_ceiling(str(tiny_shards), "train", workers=1, seconds=0.1, decoder="nope")


# ---------------------------------------------------------------------------------------------
# isolation and machine facts


CHILD = """
import multiprocessing as mp, time
from cornpipe.bench.isolate import child_main
from cornpipe.errors import LoaderError

def hold(mb):
    block = bytearray(mb * 1024 * 1024)  # touched: resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(1.0)

def measure(spec):
    if spec.get("fail"):
        raise LoaderError("shard train-000000.tar is missing")
    worker = mp.get_context("fork").Process(target=hold, args=(spec["mb"],))
    worker.start()
    worker.join()
    return {"ok": True}

if __name__ == "__main__":
    child_main(measure)
"""


def test_isolated_run_counts_the_memory_of_worker_processes(tmp_path, monkeypatch):
    (tmp_path / "memchild.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    result = run_isolated("memchild", {"mb": 300}, timeout_s=120, label="mem")
    assert result["ok"] is True
    assert result["peak_rss_mb"] >= 300  # the worker's 300 MB, not only the parent's
    with pytest.raises(BenchError, match=r"^fail failed: shard train-000000.tar is missing$"):
        run_isolated("memchild", {"mb": 1, "fail": True}, timeout_s=120, label="fail")


SLEEPER = """
import multiprocessing as mp, os, time
from pathlib import Path
from cornpipe.bench.isolate import child_main

def sleep():
    time.sleep(300)

def measure(spec):
    worker = mp.get_context("fork").Process(target=sleep)
    worker.start()
    Path(spec["pids"]).write_text(f"{os.getpid()} {worker.pid}")
    time.sleep(300)
    return {}

if __name__ == "__main__":
    child_main(measure)
"""

PARENT = """
import sys
from cornpipe.bench.isolate import run_isolated
run_isolated("sleeper", {"pids": sys.argv[1]}, timeout_s=300, label="sleeper")
"""


def gone(pid: int) -> bool:
    """No such process, or only its zombie (dead, waiting for a parent that is not ours to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_isolated_child_and_its_workers_end_when_the_parent_is_terminated(tmp_path, monkeypatch):
    # The child runs in its own session, out of reach of a signal to the parent's group (`timeout`):
    # the parent must end it on SIGTERM, or it runs on after the parent is gone.
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    (tmp_path / "parent.py").write_text(PARENT)
    pids_file = tmp_path / "pids"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(pids_file)], env=env)
    try:
        assert wait_until(lambda: pids_file.is_file() and len(pids_file.read_text().split()) == 2, 60)
        child, worker = map(int, pids_file.read_text().split())
        assert os.getsid(child) == child != os.getsid(parent.pid)  # a session of its own
        parent.send_signal(signal.SIGTERM)
        status = parent.wait(timeout=30)
        assert wait_until(lambda: gone(child) and gone(worker), 10), (child, worker)
        assert status == 128 + signal.SIGTERM  # it exited through its `finally`, not killed outright
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pids_file.is_file():
            for pid in map(int, pids_file.read_text().split()):
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)


def test_machine_facts_name_the_cores_cpu_and_library_versions():
    facts = machine_facts()
    assert facts["cores"] == len(os.sched_getaffinity(0))
    assert facts["cpu_model"] and facts["cpu_model"] != "unknown"
    assert torch.__version__.startswith(facts["libraries"]["torch"].split("+")[0])
    assert set(facts["libraries"]) >= {"torch", "torchvision", "ffcv", "dali", "numpy", "pillow"}
    assert (facts["gpu"] is None) == (not torch.cuda.is_available())
    json.dumps(facts)  # goes into every --json file


# ---------------------------------------------------------------------------------------------
# bench train


@pytest.mark.slow
def test_bench_train_reports_compile_time_apart_from_steady_state(tmp_path):
    out = tmp_path / "train.json"
    result = invoke("bench", "train", "--device", "cpu", "--model", "resnet_plus_tiny", "--image-size", 32,
                    "--batch-size", 4, "--variants", "compile", "--warmup-steps", 2, "--steps", 3,
                    "--repeats", 2, "--json", out)
    assert result.exit_code == 0, result.output
    (compiled,) = json.loads(out.read_text())["results"]
    assert compiled["variant"] == "compile" and compiled["compile"] is True and compiled["data"] == "synthetic"
    assert compiled["ratio_vs_eager"] is None  # no eager-fp32 row to compare with
    # compilation happens in the first steps and is reported there, not in the steady state
    assert compiled["compile_s"] > 1.0
    assert compiled["first_steps_s"] > compiled["compile_s"]
    assert compiled["step_ms"] / 1000 < compiled["compile_s"]
    assert len(compiled["repeats"]) == 2 and all(r > 0 for r in compiled["repeats"])
    assert "compile" in result.output and "× eager" in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_train_on_cuda_times_fp16_steps_with_events(tmp_path):
    out = tmp_path / "train.json"
    result = invoke("bench", "train", "--device", "cuda", "--model", "resnet_plus_tiny", "--image-size", 64,
                    "--batch-size", 32, "--variants", "eager-fp32,amp", "--warmup-steps", 3, "--steps", 10,
                    "--repeats", 2, "--json", out)
    assert result.exit_code == 0, result.output
    eager, amp = json.loads(out.read_text())["results"]
    assert (eager["amp"], amp["amp"]) == (None, "float16")
    for row in (eager, amp):
        assert row["device"].startswith("cuda") and row["gpu"] and row["gpu_peak_mem_mb"] > 0
        assert row["images_per_s"] > 0 and len(row["repeats"]) == 2


def test_bench_train_asks_the_loader_for_the_variant_s_memory_format(tiny_shards, monkeypatch):
    """Loader rows are built as `cornpipe train` builds them (cornpipe.runs.build): the loader delivers the
    memory format the variant names (NCHW for eager-fp32 and amp), never one the row does not claim."""
    import cornpipe.loaders as loaders
    from cornpipe.bench.train_bench import TrainBenchConfig, measure_variant

    seen = []
    real = loaders.make_loader

    def recording(shards, split, **kwargs):
        loader = real(shards, split, **kwargs)
        seen.append(loader.spec.channels_last)
        return loader

    monkeypatch.setattr(loaders, "make_loader", recording)
    cfg = TrainBenchConfig(model="resnet_plus_tiny", image_size=32, batch_size=4, device="cpu", warmup_steps=1,
                           steps=1, repeats=1, shards=str(tiny_shards), loader="torch", workers=0, data="loader")
    rows = [measure_variant(variant, cfg) for variant in ("eager-fp32", "channels_last")]
    assert [row["channels_last"] for row in rows] == seen == [False, True]


def test_bench_train_rejects_unknown_variants_and_models():
    result = invoke("bench", "train", "--variants", "eager-fp32,turbo")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: unknown variant turbo; choose from eager-fp32, channels_last, amp, compile, all")
    result = invoke("bench", "train", "--model", "resnet_plus9000")
    assert result.exit_code == 1 and "unknown model 'resnet_plus9000'" in result.output


# ---------------------------------------------------------------------------------------------
# the prepared GPU check: its step runner, its summary, and the whole script on a machine without a GPU
# (and without FFCV and DALI, like the GPU machine)

OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

GRANDCHILD = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                               "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"],
                              start_new_session=True)
open(sys.argv[1], "w").write(str(grandchild.pid))
time.sleep(300)
"""


def run_step(tmp_path: Path, name: str, limit: int, *command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmp_path), PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(["bash", "bench/gpu_check.sh", "--step", name, str(limit), *command], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_step_past_its_limit_ends_every_process_it_started(tmp_path):
    # a grandchild in a session of its own that ignores SIGTERM: neither `timeout` (its group) nor the
    # child's death reaches it; the step runner must still end it (SIGKILL after the grace)
    (tmp_path / "spawn.py").write_text(GRANDCHILD)
    pid_file = tmp_path / "grandchild.pid"
    start = time.monotonic()
    proc = run_step(tmp_path, "sleeper", 3, sys.executable, str(tmp_path / "spawn.py"), str(pid_file))
    took = time.monotonic() - start
    pid = int(pid_file.read_text())
    try:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert gone(pid), "the grandchild outlived its step"
        assert "!! sleeper: timeout (no result after 3 s)" in proc.stdout
        assert proc.stdout.strip().splitlines()[-1].split("\t")[:2] == ["sleeper", "timeout"]
        assert took < 3 + 5 + 10  # the limit, the kill grace, a margin for a busy machine
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
    assert not list(tmp_path.glob("cornpipe-*")), "the scratch folder and the import link are removed"


def test_pytest_collecting_nothing_is_not_a_passing_step(tmp_path):
    proc = run_step(tmp_path, "pytest-gpu", 60, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "-m", "no_such_marker", "tests/test_layout.py")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].split("\t")[:2] == ["pytest-gpu", "no tests collected"]
    passing = run_step(tmp_path, "ok-step", 60, sys.executable, "-c", "print('fine')")
    assert passing.returncode == 0 and passing.stdout.strip().splitlines()[-1].split("\t")[:2] == ["ok-step", "ok"]


def test_summary_fits_in_its_limit_and_out_gets_only_its_files(tmp_path):
    # a bad run: every row failed with a long message, a step timed out, most inputs missing
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    (scratch / "logs").mkdir(parents=True)
    out.mkdir()
    (out / "steps.tsv").write_text("stale\n")  # a previous check's file is replaced, not mixed in
    (scratch / "steps.tsv").write_text("data\tok\t9\t\n" + "".join(
        f"bench-train\ttimeout\t120\tno result after 120 s {'x' * 300}\n" for _ in range(3)))
    rows = [{"variant": f"v{i}", "data": "synthetic", "error": "E" * 500} for i in range(80)]
    (scratch / "bench_train.json").write_text(json.dumps({"config": {}, "results": rows}))
    (scratch / "logs" / "bench-train.log").write_text("line\n" * 100_000)
    lines = write_summary(scratch, out, "cuda", None, 400.0)
    text = "\n".join(lines)
    assert len(text) <= SUMMARY_MAX_CHARS
    assert lines[-1] == "RESULT: 3 of 4 steps not ok in 400 s: bench-train, bench-train, bench-train"
    assert sorted(p.name for p in out.iterdir()) == ["bench_train.json", "log_tail.txt", "steps.tsv",
                                                     "summary.json"]
    assert sum(line.startswith("bench-train    timeout") for line in lines) == 3  # every step keeps its line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["out_files"]["pytest.xml"] == "missing"
    assert len(summary["figures"]["bench-train"]["results"]) == 80
    assert [s["status"] for s in summary["steps"]] == ["ok", "timeout", "timeout", "timeout"]
    assert (out / "steps.tsv").read_text() == (scratch / "steps.tsv").read_text()
    assert (out / "log_tail.txt").stat().st_size < 64 * 1024  # a tail, not the log


def test_a_pytest_killed_before_its_junit_file_still_reports_what_it_ran(tmp_path):
    # pytest writes its junit file only at the end: a pytest-gpu step past its limit has none, and the
    # summary counts the per-test lines `pytest -v` printed into the step's log before it was killed
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    (scratch / "logs").mkdir(parents=True)
    (scratch / "steps.tsv").write_text("pytest-gpu\ttimeout\t115\tno result after 115 s\n")
    (scratch / "logs" / "pytest-gpu.log").write_text(
        "tests/runs/test_gpu_train.py::test_compiled_run PASSED                [ 20%]\n"
        "tests/runs/test_gpu_train.py::test_resume FAILED                      [ 40%]\n"
        "tests/loaders/test_dali.py::test_dali SKIPPED (DALI is not installed) [ 60%]\n"
        "tests/loaders/test_x.py::test_y[a b] PASSED                            [ 80%]\n")
    lines = write_summary(scratch, out, "cuda", None, 500.0)
    counts = json.loads((out / "summary.json").read_text())["figures"]["pytest-gpu"]
    assert counts == {"tests": 4, "passed": 2, "failures": 1, "errors": 0, "skipped": 1, "partial": True,
                      "failed_tests": ["tests/runs/test_gpu_train.py::test_resume"]}
    text = "\n".join(lines)
    assert "2 passed, 1 failed, 1 skipped before the step ended" in text
    assert "tests/runs/test_gpu_train.py::test_resume" in text


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path; on a GPU run the script itself")
def test_gpu_check_script_runs_without_gpu_and_brings_back_a_few_small_files(tmp_path):
    blocker = tmp_path / "no_ffcv_dali"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_FFCV_DALI)
    out, tmp = tmp_path / "gpu-out", tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, OUT=str(out), TMPDIR=str(tmp), PYTHONPATH=str(blocker),
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("GPU_CHECK_QUICK", None)
    env.pop("GPU_CHECK_SCRATCH", None)
    start = time.monotonic()
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    took = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert took < 560, took  # the script's own ceiling: its 540 s budget, a kill grace, the summary
    assert "SKIP: no CUDA GPU (" in output
    for what in ("bench train", "bench loaders", "train ("):
        assert any(line.startswith("SKIP: no CUDA GPU") and what in line for line in output.splitlines()), what

    # what comes back from a GPU machine: at most 8 plain files, small, with plain names, not deep
    files = [p for p in out.rglob("*")]
    assert all(p.is_file() and not p.is_symlink() for p in files), files
    assert sorted(p.name for p in files) == sorted(OUT_FILES) and len(files) <= 8
    for p in files:
        assert OUT_NAME.match(p.name) and len(p.relative_to(out).parts) <= 3, p
        assert p.stat().st_size < 4 * 1024**2, p
    assert sum(p.stat().st_size for p in files) < 16 * 1024**2
    assert not list(tmp.glob("cornpipe-*")), "the scratch folder (data, checkpoints, logs) is removed"

    # the summary is printed last and fits
    start_line = next(i for i, line in enumerate(proc.stdout.splitlines()) if line.startswith("GPU check summary"))
    summary_text = "\n".join(proc.stdout.splitlines()[start_line:])
    assert len(summary_text) <= SUMMARY_MAX_CHARS
    assert summary_text.splitlines()[-1].startswith("RESULT: all 5 steps ok")
    steps = [line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines()]
    assert steps == [[name, "ok"] for name in ("data", "train-run", "bench-train", "bench-loaders", "pytest-gpu")]

    # every number landed in $OUT, measured on the CPU, and the summary shows each with its ratio
    train = json.loads((out / "bench_train.json").read_text())
    assert [r["variant"] for r in train["results"]] == ["eager-fp32", "amp"]
    assert all(r["device"] == "cpu" and r["images_per_s"] > 0 for r in train["results"])
    eager, amp = train["results"]
    assert amp["amp"] == "bfloat16"
    assert amp["ratio_vs_eager"] == pytest.approx(amp["images_per_s"] / eager["images_per_s"])
    assert f"{amp['images_per_s']:,.0f} img/s  {amp['ratio_vs_eager']:.2f}× eager-fp32" in summary_text
    loaders = json.loads((out / "bench_loaders.json").read_text())
    # torchvision: the torch backend's peer (bench loaders runs the peers by default)
    assert {r["backend"] for r in loaders["results"]} == {"resident", "torch", "torchvision"}
    assert loaders["ceiling"]["images_per_s"] > 0
    assert all(r["fraction_of_ceiling"] > 0 for r in loaders["results"])
    epochs = [json.loads(line) for line in (out / "run_metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["no_gpu"] and summary["machine"]["cores"] >= 1
    assert summary["figures"]["train-run"]["epochs"] == 2 and summary["figures"]["train-run"]["loader"] == "resident"
    assert summary["figures"]["pytest-gpu"]["tests"] >= 1  # the gpu tests were collected (and skipped here)
    assert "==> train-run.log" in (out / "log_tail.txt").read_text()


def test_work_both_alternates_which_row_of_a_pair_runs_first():
    """A machine that drifts over a run must not always favour the same row of a same/full pair."""
    from cornpipe.bench.loader_bench import Row, Target, round_order

    rows = [Row(Target(b, "jpg", "s", work=w), "cpu")
            for b, w in (("ffcv", "same"), ("ffcv", "full"), ("ffcv-native", "same"), ("dali", "same"),
                         ("dali", "full"))]
    labels = [[r.target.label for r in round_order(rows, repeat)] for repeat in (0, 1, 2)]
    assert labels[0] == labels[2] == [r.target.label for r in rows]
    assert labels[1] == ["ffcv-jpg-full", "ffcv-jpg-same", "ffcv-native-jpg-same", "dali-jpg-full", "dali-jpg-same"]
