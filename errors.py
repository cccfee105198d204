"""CornpipeError and its kinds: the ground floor every part of cornpipe may import.

A CornpipeError is an error the user caused or can fix (a bad path, option, file or label). Its
message is one line; the CLI (`cornpipe.cli`) prints it as `Error: <message>` and exits 1. Anything
else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


def install_hint(extra: str) -> str:
    """How a user gets an optional part of cornpipe (an extra of pyproject.toml), e.g.
    `pip install 'cornpipe[ffcv]'`."""
    hint = f"pip install 'cornpipe[{extra}]'"
    if extra == "dali":
        hint += " (CUDA 12; 'cornpipe[dali-cuda13]' for CUDA 13 builds of torch)"
    return hint


class CornpipeError(Exception):
    """An error the user caused or can fix; the CLI prints `Error: <message>` (one line), exit 1."""


class LoaderError(CornpipeError):
    """A shard set or request that cannot be loaded; the message is one line for the user."""


class MissingDependency(LoaderError):
    """A backend's library is not installed; the message names the pip package."""


class DatasetError(CornpipeError):
    """The input layout cannot be used at all (one-line message)."""


class ConvertError(CornpipeError):
    """convert cannot go on; the message is one line for the user."""


class OutputError(CornpipeError):
    """An output path that cannot be created (its parent is a file, a read-only folder, /proc, /sys)."""


class SynthError(CornpipeError):
    """Bad synthetic-dataset parameters or an OUT that may not be written."""


class VerifyError(LoaderError):
    """A shard set failed verification; the message names every damaged file."""


class ConfigError(CornpipeError):
    """A bad option or config file; the message is one line."""


class ModelConfigError(CornpipeError, ValueError):
    """A model, loss or metric parameter a user chose (name, grade scale, weights) is not valid."""


class CheckpointError(CornpipeError):
    """A checkpoint that is missing, corrupt or from an incompatible version."""


class ReportError(CornpipeError):
    """The run directory has no readable metrics."""


class NonFiniteLoss(CornpipeError):
    """Training produced a NaN/inf loss or gradient; the run stops before stepping on it."""

    def __init__(self, epoch: int, batch: int, sample_ids: list[int], last_good: str) -> None:
        ids = ", ".join(str(i) for i in sample_ids)
        super().__init__(f"non-finite loss at epoch {epoch} batch {batch} (sample ids {ids}); "
                         f"last good checkpoint: {last_good}")
        self.epoch, self.batch, self.sample_ids = epoch, batch, sample_ids


class BenchError(CornpipeError):
    """A benchmark run that failed; the message is one line for the user."""


class DistributedError(CornpipeError):
    """A distributed (torchrun) run failed on some rank; the message names the rank and its cause."""


class ExportError(CornpipeError):
    """A model that cannot be exported as asked (a format, a missing library, an --out in use)."""
