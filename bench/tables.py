"""Rich tables of benchmark summaries (the dicts `run_loader_bench` / `run_train_bench` return)."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from cornpipe.bench.machine import describe

DASH = "—"


def _rate(entry: dict[str, Any]) -> str | Text:
    if entry.get("images_per_s") is None:
        return Text("failed", style="red") if entry.get("error") else DASH  # the tables print with markup off
    low, high = entry.get("images_per_s_min"), entry.get("images_per_s_max")
    spread = f" [{low:,.0f}–{high:,.0f}]" if low is not None and high is not None else ""
    return f"{entry['images_per_s']:,.1f}{spread}"


def _ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}×"


def _percent(value: float | None, digits: int = 0) -> str:
    return DASH if value is None else f"{100 * value:.{digits}f} %"


def _mb(value: float | None) -> str:
    return DASH if value is None else f"{value:,.0f}"


def _columns(table: Table, left: str, right: str) -> None:
    """Text columns (space-separated names), then number columns ("|"-separated names)."""
    for name in left.split():
        table.add_column(name, justify="left")
    for name in right.split("|"):
        table.add_column(name, justify="right")


def _caption(summary: dict[str, Any], timing: str) -> list[str]:
    """The caption's first lines: the machine (when known), then how the figures were timed."""
    return ([describe(summary["machine"])] if "machine" in summary else []) + [timing]


def loader_table(summary: dict[str, Any]) -> Table:
    cfg = summary["config"]
    host_only = bool(summary.get("host_only", cfg.get("host_only")))
    what = "Host-only loader throughput (uint8 NHWC crops on the CPU, no normalisation)" if host_only \
        else "Loader throughput"
    table = Table(title=f"{what}: {cfg['split']} split, batch {cfg['batch_size']}, "
                        f"{cfg['image_size']} px, {cfg['workers']} workers, oversample {cfg['oversample']}, "
                        f"work {cfg.get('work', 'full')}")
    _columns(table, "backend mode device", "images/s median [min–max]|× torch|× peer|% of ceiling|peak MB")
    oversampled = cfg["oversample"] != "none"
    both = cfg.get("work") == "both"
    if both:
        table.add_column("full ÷ same", justify="right")
    if oversampled:
        table.add_column("class fractions", justify="right")
    for entry in summary["results"]:
        name = entry["backend"] + (" (full)" if both and entry.get("work") == "full" else "")
        cells = [name, entry["mode"], entry["device"], _rate(entry), _ratio(entry["ratio_vs_torch"]),
                 _ratio(entry.get("ratio_vs_peer")), _percent(entry["fraction_of_ceiling"]), _mb(entry["peak_rss_mb"])]
        if both:
            cells.append(_ratio(entry.get("full_vs_same")))
        if oversampled:
            fractions = entry.get("class_fractions")
            cells.append("/".join(f"{f:.2f}" for f in fractions) if fractions else DASH)
        table.add_row(*cells)
    ceiling = summary.get("ceiling")
    if ceiling:
        cells = ["ceiling", "decode", "cpu", _rate(ceiling), DASH, DASH,
                 "100 %" if ceiling.get("images_per_s") else DASH, _mb(ceiling.get("peak_rss_mb"))]
        if both:
            cells.append(DASH)
        if oversampled:
            cells.append(DASH)
        table.add_row(*cells, style="dim")
    timed = f"{cfg['epochs']} epoch(s)" if cfg.get("epochs") else f"{cfg['seconds']} s"
    caption = _caption(summary, f"median of {cfg['repeats']} rounds of {timed} after warm-up, each run in a "
                                "fresh process; peak MB = PSS of the process tree")
    if any(e.get("peer") for e in summary["results"]):
        caption.append("× peer = the backend against its own library used directly (ffcv vs ffcv-native, dali vs "
                       "dali-native, torch vs torchvision)")
    if cfg.get("work") in ("same", "both"):
        caption.append(("work both: each backend's first row, and every peer," if both else "work same: every row")
                       + " does RandomResizedCrop + horizontal flip"
                       + (", then stops at uint8" if host_only else " + normalise to float32"))
    if both:
        caption.append("(full) rows keep cornpipe's default augmentation (+ vertical flip, colour jitter); full ÷ same "
                       "= the same backend's two rows, run one after the other in every round: the median of the "
                       "rounds' ratios")
    if host_only:
        caption.append("host-only: every row hands out (B, S, S, 3) uint8 crops on the host, the colour jitter and "
                       "normalisation left to the GPU: the rate a GPU would be fed")
    for entry in summary["results"]:
        if entry.get("setup"):
            caption.append(f"{entry['backend']} {entry['mode']}: {entry['setup']}")
    if ceiling:
        caption.append(f"ceiling = decode-only throughput of the shard JPEGs on {ceiling.get('workers')} "
                       f"processes ({ceiling.get('decoder')}, libjpeg-turbo), no augmentation")
    if oversampled and summary.get("dataset_class_fractions"):
        caption.append("dataset class fractions: " + "/".join(f"{f:.2f}" for f in summary["dataset_class_fractions"]))
    table.caption = "\n".join(caption)
    return table


def train_table(summary: dict[str, Any]) -> Table:
    cfg = summary["config"]
    table = Table(title=f"Training-step throughput: {cfg['model']}, {cfg['image_size']} px, "
                        f"batch {cfg['batch_size']}, {cfg['device']}"
                        + (f", {summary['results'][0]['threads']} threads" if summary["results"]
                           and "threads" in summary["results"][0] else ""))
    _columns(table, "variant data amp", "images/s median [min–max]|× eager-fp32|first steps s|compile s|"
                                          "data wait|× synthetic|peak MB|GPU MB")
    for entry in summary["results"]:
        failed = "error" in entry
        table.add_row(
            entry["variant"], entry["data"], DASH if failed else (entry.get("amp") or "off"), _rate(entry),
            _ratio(entry.get("ratio_vs_eager")),
            DASH if failed else f"{entry['first_steps_s']:.1f}",
            DASH if entry.get("compile_s") is None else f"{entry['compile_s']:.1f}",
            DASH if failed or entry["data"] == "synthetic" else _percent(entry["data_wait_share"], 1),
            _ratio(entry.get("ratio_vs_synthetic")),
            _mb(entry.get("peak_rss_mb")), _mb(entry.get("gpu_peak_mem_mb")),
        )
    timed = f"{cfg['steps']} steps" if cfg.get("steps") else f"{cfg['seconds']} s"
    caption = _caption(summary, f"median of {cfg['repeats']} windows of {timed} after {cfg['warmup_steps']} "
                                "warm-up steps; each variant in a fresh process")
    table.caption = "\n".join(caption)
    return table
