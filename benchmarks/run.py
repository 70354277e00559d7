"""Run every benchmark runner and print their tables one after another.

    python benchmarks/run.py            # CPU benchmarks (alignment, DTW, vocab map)
    python benchmarks/run.py --gpu      # plus the loss kernels (needs CUDA)
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = ["bench_align.py", "bench_dtw.py", "bench_vocab.py", "bench_corpus_align.py", "bench_extract.py",
       "kernel_resources.py"]
GPU = ["bench_loss.py", "bench_linear_loss.py"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true", help="also run the GPU benchmarks")
    args = p.parse_args()
    import numpy
    print(f"# fastfuse benchmarks, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, numpy {numpy.__version__}\n")
    failed = 0
    for name in CPU + (GPU if args.gpu else []):
        path = os.path.join(HERE, name)
        if not os.path.exists(path):
            continue
        print(f"## {name}")
        sys.stdout.flush()
        failed |= subprocess.call([sys.executable, path]) != 0
        print()
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
