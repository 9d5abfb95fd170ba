"""Train the lecture's MNIST models (Example 6.2): ``python scripts/train_mnist.py --help``, the same as
the console command ``gpunn train``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from gpunn.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
