"""The PyTorch baseline as the benchmark runs it: `sdseg_jax.benchmark_torch`, built once.

torch and diffusers are optional (requirements-bench.txt): they are imported when a baseline is
asked for, never by the JAX side.
"""

import time
from typing import Any, Dict, Optional

from sdseg_jax.bench import machine

# JAX dtype names <-> the baseline's names, to pair the runs that the ratio compares.
TORCH_NAME = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class TorchBaseline:
  """sdseg_jax.benchmark_torch's measurements, with the modules built once per process."""

  def __init__(self, device: Optional[str] = None, threads: int = 0, modules: Any = None):
    """`modules`: prebuilt benchmark_torch.Modules (tests pass small ones); else full size."""
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top

    from sdseg_jax import benchmark_torch  # pylint: disable=g-import-not-at-top
    diffusers.utils.logging.set_verbosity_error()
    if threads:
      torch.set_num_threads(threads)
    self.torch, self.lib = torch, benchmark_torch
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    self.modules = modules or benchmark_torch.build_modules(self.device)
    self.params = benchmark_torch.param_counts(self.modules)
    if modules is None:
      benchmark_torch.check_param_counts(self.params)
    self.version = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                    "threads": torch.get_num_threads(), "device": self.device}

  def measure(self, suite: str, batch: int, dtype: str, warmup: int, iters: int,
              info: Dict[str, Any]) -> Dict[str, Any]:
    load_before = machine.load_average()
    fn = self.lib.measure_inference if suite == "infer" else self.lib.measure_train_step
    cpu_start = time.process_time()
    result = fn(batch, dtype, self.device, warmup, iters, modules=self.modules)
    cpu = time.process_time() - cpu_start
    jax_dtype = {v: k for k, v in TORCH_NAME.items()}[dtype]
    result.update(
        suite=suite, s_per_image=result["median_s"] / batch,
        # Includes warm-up calls and input set-up: a rough, load-robust cross-check only.
        cpu_s_per_image_incl_warmup=cpu / (warmup + iters) / batch,
        mfu=machine.mfu(result["images_per_s"], suite, jax_dtype, info),
        achieved_tflops=result["images_per_s"] * machine.FLOPS[suite] / 1e12,
        memory={"peak_bytes": result.pop("peak_mem_bytes"),
                "peak_source": ("torch.cuda.max_memory_allocated()" if self.device != "cpu"
                                else "process peak RSS (ru_maxrss, never reset)")},
        load_before=load_before, load_after=machine.load_average())
    return result

  def release(self):
    if self.device != "cpu":
      self.torch.cuda.empty_cache()
