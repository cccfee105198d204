"""The backends behind `make_loader`, one module each, imported only when asked for (see loaders.base.BACKEND_MODULES).

- ffcv: `ffcv_loader` over .beton files (`ffcv_files`), with its own numba decoder (`ffcv_ops`);
- dali: `dali_loader`, fed by an external source over the shards (`dali_source`), jitter as a DALI
  operator (`dali_jitter`);
- torch: `torch_loader`, a torch DataLoader with PIL decode (and `folder`: the same over an original
  image folder, the "before" baseline);
- resident: `resident_loader`, decoded once into a uint8 store (`resident_decode`), batches cropped and
  finished on its own CPU threads (`crop_threads`) or as tensor ops on the GPU.

Each module provides `build(shards, spec) -> EpochLoader`; they share the pixel pipeline of
`loaders.pixels` and the epoch draw of `loaders.common`.
"""
