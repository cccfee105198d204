"""The pixel pipeline every backend shares: draws -> geometry -> finish.

- `params`: the augmentation draws (`sample_params`, `val_params`), a pure function of the seed;
- `augment`: the definition, and the draws applied per PIL image or per batch (`augment_batch`);
- `geometry`: crop-resize, flips and quarter turns of whole uint8 batches, on CPU or CUDA;
- `finish`: the finish step, colour jitter + normalisation with the run's statistics, as tensor ops,
  or one fused numba pass on the CPU (`finish_cpu`) built from the per-image kernels of
  `pixel_kernels` (also run inside the ffcv decoder and as a DALI operator);
- `memory`: the reused batch arrays the CPU finish writes into.
"""
