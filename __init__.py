"""cornpipe: convert a maize-disease survey once into FFCV and webdataset/DALI shards, feed it fast,
train a two-task (leaf position, disease grade) model.

The parts, from the edge inwards (imports point only this way; `tests/test_layout.py` holds them):

    cornpipe.cli        every click command; the one place a CornpipeError becomes `Error: <cause>`
    cornpipe.train      the training loop (`python -m cornpipe train` == `cornpipe train`)
    cornpipe.predict    a checkpoint + images -> predictions; `cornpipe.load_model(RUN).predict(images)`
    cornpipe.runs       what a run is made of: the run builder (runs.build), config, folds, checkpoint, EMA,
                        early stopping, optimiser step, metrics log, report, plots
    cornpipe.loaders    the read side: make_loader, sampling, augmentation, one module per backend
    cornpipe.models     trunks, heads, losses, metrics: plain torch, knows no data source
    cornpipe.shards     the on-disk format and what makes or checks it (discover, convert, synth,
                        inspect, verify); shards.fields is the contract readers share
    cornpipe.errors     CornpipeError and its kinds: the ground floor
    cornpipe.bench      throughput benchmarks; only the CLI's `bench` commands import it
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cornpipe.predict import load_model as load_model

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`cornpipe.load_model`, imported on first use: `import cornpipe` (and the CLI's start) loads no torch."""
    if name == "load_model":
        from cornpipe.predict import load_model as load_model

        return load_model
    raise AttributeError(f"module 'cornpipe' has no attribute {name!r}")
