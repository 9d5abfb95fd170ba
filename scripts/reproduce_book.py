"""``python scripts/reproduce_book.py``: the whole of the lecture's Example 6.2 in one command.

Trains, with the lecture's recipe (mini-batch SGD, γ = 0.5, n_b = 100, 15 epochs, the whole validation set
evaluated every 100 iterations), on MNIST:

* logistic regression, 784 → 10 (a one-layer network, 7 850 parameters): Figure 6.7, lecture ≈ 8 %;
* a two-layer network, 784-200-10 with ReLU hidden units (159 010 parameters): Figure 6.8, lecture ≈ 2 %;

and writes both figures (mini-batch cost and misclassification in blue, validation in red) and a table
of the final validation errors beside the lecture's (``results.md``, also printed). The data come from
``--data-dir`` (any folder with the four MNIST-layout IDX files), else ``$GPUNN_DATA_DIR``, else a download
into the cache. ``--quick`` trains one epoch on at most 5 000 training and 1 000 validation images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from gpunn.cli import config_from_flags
from gpunn.commands import Parser, device_name, plot_history, run_command
from gpunn.commands import device as cli_device
from gpunn.data import load_idx_dataset, resolve_data_dir
from gpunn.files import display_path, write_atomic
from gpunn.train import Config, iterations_per_epoch

PROG = "reproduce_book.py"
# (name, hidden widths, figure file, figure number, the lecture's final validation error in %)
MODELS = (
    ("logistic regression", [], "fig6_7_logistic_regression.png", "Figure 6.7", 8.0),
    ("two-layer network, 200 ReLU units", [200], "fig6_8_two_layer.png", "Figure 6.8", 2.0),
)
QUICK_TRAIN, QUICK_VAL = 5000, 1000


def results_table(rows: list[dict]) -> str:
    """A markdown table of the final validation errors beside the lecture's."""
    lines = [
        "| model | parameters | validation error (gpunn) | lecture | training | with evaluations |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['architecture']}) | {r['parameters']:,} | {100 * r['val_error']:.2f} % "
            f"| ≈ {r['lecture']:g} % | {r['train_time']:.1f} s | {r['wall_time']:.1f} s |"
        )
    return "\n".join(lines) + "\n"


# --- the command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Example 6.2: logistic regression and a 784-200-10 ReLU network on MNIST with the "
        "lecture's recipe; writes Figures 6.7 and 6.8 and a table of validation errors.",
    )
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the four MNIST-layout IDX files (.gz or not), read only; "
        "else $GPUNN_DATA_DIR, else a download into ~/.cache/gpunn/mnist",
    )
    p.add_argument("--out", type=Path, default=Path("runs/lecture"), help="folder for the figures and table")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the data order")
    p.add_argument("--epochs", type=int, default=15, help="epochs per model")
    p.add_argument("--eval-every", type=int, default=100, help="iterations between validation evaluations")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: 1 epoch on at most {QUICK_TRAIN} training and {QUICK_VAL} validation images",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, build_parser().parse_args, _run, argv)


def _config(args, hidden: list[int]) -> Config:
    epochs, eval_every = (1, 10) if args.quick else (args.epochs, args.eval_every)
    return config_from_flags(hidden=hidden, epochs=epochs, eval_every=eval_every, seed=args.seed)


def _run(args) -> int:
    configs = [_config(args, hidden) for _, hidden, *_ in MODELS]
    device = cli_device(PROG, args.device)
    folder = resolve_data_dir(args.data_dir, progress=sys.stderr.isatty())
    train_split, val_split = load_idx_dataset(folder)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        train_split.X, train_split.y = train_split.X[:QUICK_TRAIN], train_split.y[:QUICK_TRAIN]
        val_split.X, val_split.y = val_split.X[:QUICK_VAL], val_split.y[:QUICK_VAL]
    n_train, n_val = train_split.X.shape[0], val_split.X.shape[0]
    per_epoch = iterations_per_epoch(n_train, configs[0].batch_size)
    print(
        f"Example 6.2 on {display_path(folder)} ({n_train} training / {n_val} validation images) on "
        f"{device.description()}: SGD, γ = {configs[0].lr}, n_b = {configs[0].batch_size}, "
        f"{configs[0].epochs} epoch(s) × {per_epoch} iterations, validation every {configs[0].eval_every}"
    )

    rows = []
    for (name, _, filename, figure, lecture), cfg in zip(MODELS, configs):
        started = time.perf_counter()

        def progress(r: dict, name=name) -> None:
            if r["iteration"] % per_epoch == 0:
                print(
                    f"  {name}: epoch {r['epoch']:.0f}, validation error {100 * r['val_error']:.2f} %",
                    flush=True,
                )

        net, history = cfg.train(train_split, val_split, device, on_eval=progress)
        records = history.records
        arch = "-".join(map(str, net.sizes))
        rows.append(
            {
                "model": name,
                "architecture": arch,
                "parameters": net.num_params,
                "lecture": lecture,
                "val_error": records[-1]["val_error"],
                "train_time": history.train_time,
                "wall_time": time.perf_counter() - started,
            }
        )
        title = f"{figure}: {name} ({arch}) on MNIST, γ = {cfg.lr}, n_b = {cfg.batch_size}"
        plot_history(PROG, args.out / filename, history, title)

    table = results_table(rows)
    if args.quick:
        table += "\nQuick run (1 epoch on a subset): not comparable with the lecture's numbers.\n"
    write_atomic(args.out / "results.md", lambda f: f.write(table.encode()))
    print()
    print(table, end="")
    figures = ", ".join(filename for _, _, filename, *_ in MODELS)
    wall = sum(r["wall_time"] for r in rows)
    print(f"(wrote results.md, {figures} in {display_path(args.out)}; wall time {wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
