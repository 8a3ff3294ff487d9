"""Data layer: raw-record sources for the five SDSeg datasets, grain pipelines, splits, checks.

Public entry points:
  registry.make_source(data_config, split, split_dir)        raw records (see base.py)
  pipeline.make_train_loader(...) / pipeline.make_eval_loader(...)   host-local batches
  check.quick_check(data_config, split_dir)                   fast pre-training integrity check
  configs.get_data_config(name, root)                         the `config.data` block per dataset
"""
