r"""Input-pipeline throughput: decoded, resized, flipped 256x256 Kvasir-SEG samples per second.

  python -m sdseg_jax.data.benchmark_input --root /path/to/Kvasir-SEG [--workers 0,2] \
      [--batch 16] [--batches 40] [--warmup 5] [--read_threads 4]

For each worker count it builds the real train loader (folder format, 800-image train split),
skips `warmup` batches (worker start-up, page cache) and times `batches` more. Prints one line
per setting. Numbers depend on the CPU count and on JPEG sizes (Kvasir images are up to
1920x1072, so decoding dominates).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

from sdseg_jax.data import configs
from sdseg_jax.data import pipeline


def measure(root: str, worker_count: int, batch: int, batches: int, warmup: int,
            read_threads: int, image_size: int = 256) -> float:
  """Samples per second of the Kvasir train loader with `worker_count` worker processes."""
  c = configs.get_data_config("kvasir", root)
  c.image_size = image_size
  c.read_threads = read_threads
  with tempfile.TemporaryDirectory() as tmp:
    it = pipeline.make_train_loader(c, split_dir=pathlib.Path(tmp) / "splits",
                                    global_batch_size=batch, process_index=0, process_count=1,
                                    seed=0, worker_count=worker_count)
    try:
      for _ in range(warmup):
        next(it)
      start = time.perf_counter()
      for _ in range(batches):
        b = next(it)
        assert b["image"].shape == (batch, image_size, image_size, 3)
        del b
      elapsed = time.perf_counter() - start
    finally:
      if hasattr(it, "close"):
        it.close()
  return batch * batches / elapsed


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True, help="Kvasir-SEG folder (images/, masks/)")
  parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--read_threads", type=int, default=4)
  args = parser.parse_args(argv)
  pipeline.ensure_absl_flags_parsed()
  for w in (int(x) for x in args.workers.split(",")):
    rate = measure(args.root, w, args.batch, args.batches, args.warmup, args.read_threads)
    print(f"kvasir 256x256 train pipeline: worker_count={w} read_threads={args.read_threads} "
          f"batch={args.batch}: {rate:.1f} samples/s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
