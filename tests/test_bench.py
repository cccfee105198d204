"""bench: the loader and training-step benchmarks, the decode ceiling, and the prepared GPU check.

Tiny data, 32 px, a tiny model and short windows: these tests check what the harness reports and
that it reports it from what really happened, not how fast anything is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cornpipe.bench.ceiling import decode_ceiling
from cornpipe.bench.isolate import run_isolated
from cornpipe.bench.machine import machine_facts
from cornpipe.cli import cli
from cornpipe.errors import BenchError

REPO = Path(__file__).resolve().parent.parent
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


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


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
    assert rows["torch"]["ratio_vs_torch"] == pytest.approx(1.0)
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


def test_bench_train_rejects_unknown_variants_and_models():
    result = invoke("bench", "train", "--variants", "eager-fp32,turbo")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: unknown variant turbo; choose from eager-fp32, channels_last, amp, compile, all")
    result = invoke("bench", "train", "--model", "resnet_plus9000")
    assert result.exit_code == 1 and "unknown model 'resnet_plus9000'" in result.output


# ---------------------------------------------------------------------------------------------
# the prepared GPU check, on a machine without a GPU (and without FFCV and DALI, like the GPU machine)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path; on a GPU run the script itself")
def test_gpu_check_script_runs_without_gpu_and_says_what_it_skipped(tmp_path):
    blocker = tmp_path / "no_ffcv_dali"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_FFCV_DALI)
    out = tmp_path / "gpu-out"
    env = dict(os.environ, OUT=str(out), PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=str(blocker))
    env.pop("GPU_CHECK_QUICK", None)
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "SKIP: no CUDA GPU (" in output
    for what in ("bench train", "bench loaders", "train ("):
        assert any(line.startswith("SKIP: no CUDA GPU") and what in line for line in output.splitlines()), what
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].startswith("RESULT: all 6 steps ok") and "GPU check summary" in proc.stdout
    steps = [line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines()]
    assert steps == [[name, "ok"] for name in ("pytest-gpu", "data", "bench-train", "bench-train-loader",
                                               "bench-loaders", "train-run")]
    # every number landed in $OUT, measured on the CPU
    train = json.loads((out / "bench_train.json").read_text())
    assert [r["variant"] for r in train["results"]] == ["eager-fp32", "amp"]
    assert all(r["device"] == "cpu" and r["images_per_s"] > 0 for r in train["results"])
    assert train["results"][1]["amp"] == "bfloat16"
    assert train["results"][0]["ratio_vs_eager"] == pytest.approx(1.0)
    assert train["results"][1]["ratio_vs_eager"] == pytest.approx(
        train["results"][1]["images_per_s"] / train["results"][0]["images_per_s"])
    fed = json.loads((out / "bench_train_loader.json").read_text())["results"][0]
    assert fed["data"] == "resident loader" and 0 <= fed["data_wait_share"] < 1
    loaders = json.loads((out / "bench_loaders.json").read_text())
    assert {r["backend"] for r in loaders["results"]} == {"resident", "torch"}
    assert loaders["ceiling"]["images_per_s"] > 0
    assert all(r["fraction_of_ceiling"] > 0 for r in loaders["results"])
    assert (out / "run" / "metrics.jsonl").is_file() and (out / "machine.json").is_file()
    assert json.loads((out / "summary.json").read_text())["no_gpu"]
