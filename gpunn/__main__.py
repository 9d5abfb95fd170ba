"""``python -m gpunn train|eval|export``: the console command ``gpunn`` without its installed script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
