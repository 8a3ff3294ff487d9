"""The throughput benchmark's parts; `python -m sdseg_jax.benchmark` is its command line.

  machine.py       device, peak FLOP/s, load average, memory report, model FLOPs and MFU
  jax_runners.py   the compiled JAX inference call and train step, timed per batch size
  torch_runner.py  the PyTorch baseline (sdseg_jax.benchmark_torch) as the run drives it
  report.py        the run over suites, batch sizes and rounds; the JSON report and its table
"""
