"""`cornpipe convert` under faults and odd input (issue 13): conflicting duplicates, reproducible .beton
bytes, kill -9 / SIGTERM mid-run, a full disk, and staging size / memory.

Each test holds a promise a user relies on: every input is converted or rejected with its reason,
the same input gives the same bytes, and an interrupted or failed run leaves nothing behind (no OUT, no
temporary folder, no worker processes) and never blocks the next run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FORMATS, cli_run, error_line, installed, jpeg_bytes

from cornpipe.errors import ConvertError
from cornpipe.shards.convert import convert_dataset
from cornpipe.shards.inspect import inspect_shards

REPO = Path(__file__).resolve().parents[2]


run = cli_run  # the shared helpers of conftest, under this file's short name


def rejected_csv(out: Path) -> dict[str, str]:
    with open(out / "rejected.csv", newline="", encoding="utf-8") as f:
        return {r["path"]: r["reason"] for r in csv.DictReader(f)}


def temp_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


# --------------------------------------------------------------------------- 9. duplicates with conflicting labels

def test_identical_bytes_with_conflicting_labels_are_all_rejected(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rows: dict[str, list[str]] = {"9l": [], "9m": [], "14m": []}
    for i in range(8):  # unique images so both splits have some
        (src / "9l").mkdir(parents=True, exist_ok=True)
        (src / "9l" / f"u{i}.jpg").write_bytes(jpeg_bytes(100 + i))
        rows["9l"].append(f"u{i}.jpg,3")
    for folder in ("9m", "14m"):
        (src / folder).mkdir(parents=True, exist_ok=True)
    same = jpeg_bytes(1)
    (src / "14m" / "img_000.jpg").write_bytes(same)  # grade 9 ...
    (src / "14m" / "copy_of_000.jpg").write_bytes(same)  # ... and grade 3: which one is right? neither kept
    rows["14m"] += ["img_000.jpg,9", "copy_of_000.jpg,3"]
    other = jpeg_bytes(2)
    (src / "9l" / "leaf.jpg").write_bytes(other)  # lower ...
    (src / "9m" / "leaf.jpg").write_bytes(other)  # ... and middle, same grade: conflicting position
    rows["9l"].append("leaf.jpg,5")
    rows["9m"].append("leaf.jpg,5")
    agree = jpeg_bytes(3)
    (src / "9m" / "a.jpg").write_bytes(agree)  # same labels: one is kept, as before
    (src / "9m" / "b.jpg").write_bytes(agree)
    rows["9m"] += ["a.jpg,7", "b.jpg,7"]
    for folder, lines in rows.items():
        (src / folder / "labels.csv").write_text("file,grade\n" + "".join(f"{ln}\n" for ln in lines))

    out = tmp_path / "out"
    result = run("convert", src, out, "--formats", "wds", "--workers", 2, "--max-resolution", 32,
                 "--val-fraction", 0.25)
    assert result.exit_code == 0, result.output
    rejected = rejected_csv(out)
    conflict = "identical bytes, conflicting labels: "
    assert rejected["14m/img_000.jpg"] == rejected["14m/copy_of_000.jpg"] == (
        conflict + "14m/copy_of_000.jpg is middle grade 3, 14m/img_000.jpg is middle grade 9")
    assert rejected["9l/leaf.jpg"] == rejected["9m/leaf.jpg"] == (
        conflict + "9l/leaf.jpg is lower grade 5, 9m/leaf.jpg is middle grade 5")
    assert rejected["9m/b.jpg"] == "duplicate of 9m/a.jpg (same bytes)"
    assert "9m/a.jpg" not in rejected
    assert "converted 9 + rejected 5 = found 14" in result.output
    assert "4x identical bytes, conflicting labels" in result.output

    info = inspect_shards(out)
    assert info["converted"] + info["rejected"] == info["found"] == 14
    assert info["conflicting_duplicates"] == [
        {"path": p, "reason": rejected[p]}
        for p in ("14m/copy_of_000.jpg", "14m/img_000.jpg", "9l/leaf.jpg", "9m/leaf.jpg")]
    shown = run("inspect", out)
    assert shown.exit_code == 0, shown.output
    assert "14m/img_000.jpg" in shown.output and "conflicting labels" in shown.output


def test_accounting_check_raises_a_convert_error_not_an_assert() -> None:
    from cornpipe.shards.convert import check_accounting

    check_accounting(found=10, converted=7, rejected=3)
    with pytest.raises(ConvertError, match=r"7 converted \+ 2 rejected != 10 found"):
        check_accounting(found=10, converted=7, rejected=2)


# --------------------------------------------------------------------------- 8. same input, same .beton bytes

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.skipif(not installed("ffcv"), reason="writing a .beton needs FFCV")
@pytest.mark.parametrize("write_mode", ["jpg", "raw"])
def test_two_converts_with_two_workers_give_the_same_beton_bytes(synth_raw: Path, tmp_path: Path,
                                                                 write_mode: str) -> None:
    hashes = []
    for i in range(3):
        out = tmp_path / f"out{i}"
        convert_dataset(synth_raw, out, max_resolution=64, write_mode=write_mode, workers=2, seed=0)
        hashes.append({name: sha256(out / name) for name in ("train.beton", "val.beton", "manifest.json")})
    assert hashes[0] == hashes[1] == hashes[2]


# --------------------------------------------------------------------------- 1. kill -9 / SIGTERM mid-run

# Runs `cornpipe convert` with a slowed-down step so a signal lands in a known phase. The patch is made
# before the workers fork, so they inherit it.
SLOW_RUNNER = """
import os, sys, time
import cornpipe.shards as shards_pkg, importlib, pkgutil
phase = sys.argv[1]
mods = [importlib.import_module(f"cornpipe.shards.{m.name}") for m in pkgutil.iter_modules(shards_pkg.__path__)]
def slow(fn, seconds):
    def wrapped(*a, **k):
        open(os.environ["PHASE_MARK"], "a").close()
        time.sleep(seconds)
        return fn(*a, **k)
    return wrapped
for mod in mods:
    if phase == "decode" and hasattr(mod, "prepare_image"):
        mod.prepare_image = slow(mod.prepare_image, 0.2)
    if phase == "write" and hasattr(mod, "write_shards"):
        mod.write_shards = slow(mod.write_shards, 3.0)
from cornpipe.cli import main
sys.argv = ["cornpipe", *sys.argv[2:]]
main()
"""


def session_processes(sid: int) -> list[int]:
    """Live processes (not zombies) whose session is `sid`: the run and every worker it started."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != b"Z":
            pids.append(int(entry))
    return pids


def start_slow_convert(phase: str, src: Path, out: Path, workers: int, mark: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", SLOW_RUNNER, phase, "convert", str(src), str(out), "--workers", str(workers),
           "--max-resolution", "64", "--formats", ",".join(FORMATS)]
    return subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PHASE_MARK": str(mark)})


def wait_for_phase(proc: subprocess.Popen, mark: Path, phase: str, timeout: float = 120) -> None:
    """Wait until the slowed step has begun (it touches `mark`) and, mid-decode, the workers exist."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if mark.exists() and (phase != "decode" or len(session_processes(proc.pid)) > 1):
            time.sleep(0.3)  # well inside the step
            return
        time.sleep(0.02)
    raise AssertionError(f"convert did not reach the slowed step: {proc.communicate()}")


def wait_until_gone(sid: int, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = session_processes(sid)
        if not left:
            return []
        time.sleep(0.05)
    return session_processes(sid)


def kill_session(sid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cornpipe.shards.synth import make_synthetic

    out = tmp_path_factory.mktemp("survey") / "raw"
    make_synthetic(out, per_source=8, image_size=96, seed=1, workers=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["decode", "write"])
def test_kill_9_leaves_no_workers_and_the_rerun_cleans_up(survey: Path, tmp_path: Path, phase: str) -> None:
    out = tmp_path / "kz"
    proc = start_slow_convert(phase, survey, out, workers=2, mark=tmp_path / "mark")
    try:
        wait_for_phase(proc, tmp_path / "mark", phase)
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, as `kill -9 $!` does
        proc.wait(timeout=30)
        left = wait_until_gone(proc.pid)
        assert left == [], f"processes of the killed convert still alive: {left}"
    finally:
        kill_session(proc.pid)
        proc.communicate()
    assert not out.exists()
    leftovers = temp_dirs(out)
    assert len(leftovers) == 1
    result = run("convert", survey, out, "--workers", 2, "--max-resolution", 64, "--formats", ",".join(FORMATS))
    assert result.exit_code == 0, result.output
    assert f"removed {leftovers[0].name}, left by an interrupted convert" in result.output
    assert temp_dirs(out) == []
    assert "converted 72 + rejected 0 = found 72" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["decode", "write"])
def test_sigterm_aborts_like_ctrl_c(survey: Path, tmp_path: Path, phase: str) -> None:
    out = tmp_path / "kz"
    proc = start_slow_convert(phase, survey, out, workers=2, mark=tmp_path / "mark")
    try:
        wait_for_phase(proc, tmp_path / "mark", phase)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        left = wait_until_gone(proc.pid)
    finally:
        kill_session(proc.pid)
    assert left == [], f"processes of the stopped convert still alive: {left}"
    assert proc.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1] == "Aborted!", stderr
    assert "Traceback" not in stderr
    assert not out.exists() and temp_dirs(out) == []


def test_a_dead_runs_lock_held_by_its_orphans_is_reclaimed(survey: Path, tmp_path: Path) -> None:
    """Workers of an older cornpipe outlived their killed parent and still hold the lock: the run whose
    pid names the folder is dead, so the folder is a leftover, not a live run."""
    out = tmp_path / "kz"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".kz.tmp-{dead_pid}"
    stale.mkdir()
    (stale / "big.bin").write_bytes(b"x" * 1000)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR);"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
                               str(stale / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run("convert", survey, out, "--workers", 1, "--max-resolution", 32, "--formats", "wds")
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 0, result.output
    assert f"removed {stale.name}, left by an interrupted convert" in result.output
    assert not stale.exists()


# --------------------------------------------------------------------------- 2. disk full

NO_SPACE = re.compile(r"no space left on (\S+) \(needed ~([\d.]+) MB, free ([\d.]+) MB\)")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MiB tmpfs (root only; skipped where mount is not permitted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def big_jpegs(tmp_path: Path) -> Path:
    """6 noise JPEGs of 512 px in two sources: about 2.5 MB of input, more than 3 MiB of output."""
    src = tmp_path / "src"
    for k, folder in enumerate(("9l", "9m")):
        (src / folder).mkdir(parents=True)
        names = []
        for i in range(3):  # distinct seeds: identical bytes in two folders would be a label conflict
            (src / folder / f"{i}.jpg").write_bytes(jpeg_bytes(100 * k + i, 512))
            names.append(f"{i}.jpg,3")
        (src / folder / "labels.csv").write_text("file,grade\n" + "".join(f"{n}\n" for n in names))
    return src


def check_nothing_left(mnt: Path) -> None:
    assert [p.name for p in mnt.iterdir()] == []


def test_too_little_space_is_refused_before_starting(big_jpegs: Path, small_disk: Path) -> None:
    out = small_disk / "out"
    start = time.monotonic()
    result = run("convert", big_jpegs, out, "--workers", 2, "--formats", ",".join(FORMATS))
    assert result.exit_code == 1
    m = NO_SPACE.fullmatch(error_line(result).removeprefix("Error: "))
    assert m, result.output
    assert m.group(1) == str(small_disk)
    assert float(m.group(2)) > float(m.group(3)) and float(m.group(3)) <= 3.2
    assert time.monotonic() - start < 30
    check_nothing_left(small_disk)


def _plenty_of_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the up-front check pass, so the disk fills up while writing."""
    real = shutil.disk_usage

    def fake(path: object) -> object:
        usage = real(path)
        return type(usage)(usage.total, usage.used, 1 << 40)

    monkeypatch.setattr(shutil, "disk_usage", fake)


@pytest.mark.timeout(60)
def test_disk_full_while_staging_is_one_error_line(big_jpegs: Path, small_disk: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _plenty_of_space(monkeypatch)
    # fill the disk but 200 KB: staging the first images fails
    free = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 200_000))
    out = small_disk / "out"
    result = run("convert", big_jpegs, out, "--workers", 2, "--formats", ",".join(FORMATS))
    assert result.exit_code == 1, result.output
    assert NO_SPACE.fullmatch(error_line(result).removeprefix("Error: ")), result.output
    assert "Traceback" not in result.output
    (small_disk / "filler").unlink()
    check_nothing_left(small_disk)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("step", ["beton", "shards"])
def test_disk_full_while_writing_outputs_is_one_error_line(big_jpegs: Path, small_disk: Path, step: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if step == "beton" and "beton" not in FORMATS:
        pytest.skip("writing a .beton needs FFCV")
    import cornpipe.shards.convert as convert_module

    _plenty_of_space(monkeypatch)
    original = getattr(convert_module, f"write_{step}")

    def fill_then_write(*args: object, **kwargs: object) -> object:
        free = os.statvfs(small_disk)
        with open(small_disk / "filler", "ab") as f:  # leave 100 KB: the writer runs out part-way
            f.write(b"\0" * max(0, free.f_bavail * free.f_frsize - 100_000))
        return original(*args, **kwargs)

    monkeypatch.setattr(convert_module, f"write_{step}", fill_then_write)
    out = small_disk / "out"
    formats = ",".join(FORMATS) if step == "beton" else "wds"  # a .beton would fill the disk first
    result = run("convert", big_jpegs, out, "--workers", 2, "--max-resolution", 256, "--formats", formats)
    assert result.exit_code == 1, result.output
    assert NO_SPACE.fullmatch(error_line(result).removeprefix("Error: ")), result.output
    (small_disk / "filler").unlink()
    check_nothing_left(small_disk)


# --------------------------------------------------------------------------- 3. staging size

@pytest.mark.parametrize("write_mode", ["jpg", "raw", "smart"])
def test_staging_is_at_most_one_and_a_half_times_the_output(synth_raw: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             write_mode: str) -> None:
    if write_mode != "jpg" and "beton" not in FORMATS:
        pytest.skip("write modes are .beton options")
    import cornpipe.shards.convert as convert_module

    peak = []
    original = convert_module.write_shards

    def measure(folder: Path, *args: object, **kwargs: object) -> object:
        # staging is complete (every image decoded) when the first tar is written
        peak.append(sum(p.stat().st_size for p in (folder / "_staging").rglob("*") if p.is_file()))
        return original(folder, *args, **kwargs)

    monkeypatch.setattr(convert_module, "write_shards", measure)
    out = tmp_path / "out"
    convert_dataset(synth_raw, out, max_resolution=96, write_mode=write_mode, workers=2, formats=FORMATS)
    payload = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".tar", ".beton"))
    assert max(peak) <= 1.5 * payload, (max(peak), payload)
    if write_mode == "jpg":  # on tiny data the .beton is mostly page padding: compare with the tars alone
        tars = sum(p.stat().st_size for p in out.glob("*.tar"))
        assert max(peak) <= 1.5 * tars, (max(peak), tars)
