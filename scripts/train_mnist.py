"""Train the lecture's MNIST models (Example 6.2): ``python scripts/train_mnist.py --help``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from gpunn.cli import main

if __name__ == "__main__":
    sys.exit(main())
