"""Run one measurement in a fresh Python process and record the peak memory of its process tree.

Why a fresh process per measurement: each backend starts its own worker processes and threads
(torch DataLoader workers, FFCV's thread pool, DALI's pipeline threads); running them one after the
other in one process lets leftovers of one slow down the next, and a process's peak RSS only ever
grows. Here the parent starts `python -m <module> SPEC RESULT`, samples the memory of the child and
all its descendants from /proc while it runs, and reads the child's result JSON.

Memory is the proportional set size (PSS: resident pages, shared pages split between the processes
sharing them) summed over the process tree, so N forked workers sharing libtorch are not counted N
times. Where /proc/<pid>/smaps_rollup is unreadable, VmRSS is used instead.

The child runs in a new session (so its whole group can be ended at once, workers included), which
also puts it beyond a signal sent to the parent's process group (`timeout`, a terminal's Ctrl-C). So
while a child runs, SIGTERM and SIGHUP to the parent end the child's group before the parent exits
(status 128 + signal), instead of leaving the child running on its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cornpipe.errors import BenchError, CornpipeError

SAMPLE_INTERVAL_S = 0.25
EXIT_GRACE_S = 15.0  # a child that wrote its result but has not exited after this is ended
END_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _signals_exit() -> Iterator[None]:
    """Within: SIGTERM/SIGHUP raise SystemExit(128 + signal), so `finally` blocks run and end the child.

    Python's default for SIGTERM is to die at once, skipping every `finally`. Only the main thread
    may set handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in END_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (the child and the workers it forked), then reap the child.

    The group is ended even when the child has exited: a worker it forked may still be in it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is empty
        pass
    proc.wait()


def _read_kb(path: str, key: str) -> int | None:
    try:
        with open(path, "rb") as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _process_tree(root_pid: int) -> list[int]:
    """root_pid and all its live descendants, from /proc/<pid>/stat parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: fields follow the last ')'
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, ()))
    return tree


def tree_memory_mb(root_pid: int) -> float:
    """Current memory (PSS, falling back to RSS) of a process and its descendants, in MB."""
    total_kb = 0
    for pid in _process_tree(root_pid):
        kb = _read_kb(f"/proc/{pid}/smaps_rollup", b"Pss:")
        if kb is None:
            kb = _read_kb(f"/proc/{pid}/status", b"VmRSS:")
        total_kb += kb or 0
    return total_kb / 1024


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_isolated(module: str, spec: dict[str, Any], *, timeout_s: float, label: str,
                 log_dir: Path | None = None) -> dict[str, Any]:
    """Run `python -m module` on `spec` in a fresh process; its result plus `peak_rss_mb`.

    The child's stdout and stderr go to a log file (kept in `log_dir` when given). A child that
    fails raises BenchError with the child's one-line error, or the last line of its stderr.
    """
    with tempfile.TemporaryDirectory(prefix="cornpipe-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        log_path = (log_dir / f"{label}.log") if log_dir else Path(tmp) / "child.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)  # the child imports cornpipe as this process did (install or PYTHONPATH)
        peak_mb, deadline = 0.0, time.monotonic() + timeout_s
        finished_at: float | None = None  # when the result file appeared
        proc: subprocess.Popen | None = None
        with open(log_path, "wb") as log, _signals_exit():
            try:
                # a new session, so a timeout can end the child together with its workers
                proc = subprocess.Popen([sys.executable, "-m", module, str(spec_path), str(result_path)],
                                        stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
                while proc.poll() is None:
                    peak_mb = max(peak_mb, tree_memory_mb(proc.pid))
                    now = time.monotonic()
                    if finished_at is None and result_path.exists():
                        finished_at = now
                    if finished_at is not None and now - finished_at > EXIT_GRACE_S:
                        break  # measured, but stuck at exit (a library's threads): end it below
                    if now > deadline:
                        raise BenchError(f"{label}: no result after {timeout_s:.0f} s (log: {log_path})")
                    time.sleep(SAMPLE_INTERVAL_S)
            finally:  # also on SystemExit from SIGTERM (see _signals_exit)
                if proc is not None:
                    _end_group(proc)
        result = json.loads(result_path.read_text()) if result_path.exists() else None
        # a result without "error" counts even if the child then crashed at exit (seen with
        # native libraries' threads at interpreter shutdown)
        if result is None or "error" in result:
            if result and "error" in result:
                cause = result["error"]
            else:
                tail = [line for line in _tail(log_path).splitlines() if line.strip()]
                cause = tail[-1].strip() if tail else f"exit status {proc.returncode}"
            raise BenchError(f"{label} failed: {cause}")
    # the child's own getrusage peak is a floor: a short run may finish between two samples
    result["peak_rss_mb"] = round(max(peak_mb, result.pop("self_peak_rss_mb", 0.0)), 1)
    return result


def child_main(measure: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Entry point of a child process: `python -m bench.X SPEC RESULT` runs measure(spec)."""
    spec_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])

    def write(obj: dict[str, Any]) -> None:  # atomically: the parent polls for the file
        tmp = result_path.with_suffix(".part")
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, result_path)

    spec = json.loads(spec_path.read_text())
    try:
        result = measure(spec)
    except CornpipeError as exc:
        write({"error": (str(exc) or type(exc).__name__).splitlines()[0]})
        sys.exit(2)
    except Exception as exc:
        traceback.print_exc()
        write({"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
        sys.exit(1)
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across exec
    self_kb = _read_kb("/proc/self/status", b"VmHWM:")
    result["self_peak_rss_mb"] = (self_kb or 0) / 1024
    write(result)
