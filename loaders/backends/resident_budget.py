"""One memory budget for the resident stores of a run (train + val + any split loaded again).

Measured once, at the first store: on CUDA after `torch.cuda.empty_cache()` (memory PyTorch keeps
cached from an earlier run in the process, as in `cv` or `--seeds`, is free for this one), then
three quarters of what is free; the last quarter is the reserve for the model's activations,
gradients and optimizer state. On the CPU half the available RAM (psutil). A store that does not
fit what the other splits left is one LoaderError with the numbers, before anything is decoded.
"""

from __future__ import annotations

import torch

from cornpipe.errors import LoaderError

STORE_SHARE = 0.75  # of free CUDA memory; the rest is the model's reserve
CPU_SHARE = 0.5  # of available RAM


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def free_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes the stores may take together, how that was measured) on `device`."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * STORE_SHARE), f"{STORE_SHARE:.0%} of the {_gib(free)} free after emptying the cache"
    import psutil

    available = psutil.virtual_memory().available
    return int(available * CPU_SHARE), f"{CPU_SHARE:.0%} of the {_gib(available)} of RAM available"


class MemoryBudget:
    """Bytes a run's resident stores may hold together on one device; `total` None: measured at first use."""

    def __init__(self, device: str | torch.device, total: int | None = None) -> None:
        self.device = torch.device(device)
        self.total, self.how = (total, "as given") if total is not None else (None, "")
        self.shares: dict[str, int] = {}  # split -> bytes its store holds

    @property
    def used(self) -> int:
        return sum(self.shares.values())

    def take(self, split: str, need: int, what: str) -> None:
        """Reserve `need` bytes for `split`'s store (replacing that split's earlier share), or raise."""
        if self.total is None:
            self.total, self.how = free_bytes(self.device)
        others = {s: n for s, n in self.shares.items() if s != split}
        left = self.total - sum(others.values())
        if need > left:
            held = "; ".join(f"the {s} store holds {_gib(n)}" for s, n in others.items()) or "no other store"
            raise LoaderError(
                f"resident backend needs {_gib(need)} for {what} but the run's resident stores may use "
                f"{_gib(self.total)} on {self.device} ({self.how}) and {held}, leaving {_gib(max(left, 0))}; "
                f"use backend torch, ffcv or dali, or convert with a smaller --max-resolution")
        self.shares[split] = need
