"""``python scripts/xor.py``: the lecture's two-layer network that solves XOR, set by hand, then trained.

Part 1 is the lecture's hand-set ReLU network (6.8a–b) with p = 2 inputs and U = 2 hidden units,

    W^(1) = [[1, 1], [1, 1]],  b^(1) = (0, −1),  W^(2) = (1, −2),  b^(2) = 0,
    q = max(0, W^(1) x + b^(1)),  y = W^(2) q + b^(2).

It maps the four inputs into the feature space q, where (0, 1) and (1, 0) both land on q = (1, 0), so the
line q1 − 2 q2 = 1/2 separates the classes there although no line does in the input space; the
outputs are exactly (0, 1, 1, 0).

Part 2 trains a 2-2-1 network from random initialisation with full-batch gradient descent on the squared
error (task "regression", linear output as in (6.8b)) and calls XOR solved when each of the four outputs
is within 0.1 of its target. The default hidden activation is tanh, not the lecture's ReLU, because a
2-2-1 ReLU network from gpunn's initialisation (b = 0, He-scaled W) gets stuck most of the time: over
seeds 0–99 with γ = 0.1, momentum 0.9 and 1000–5000 iterations only 10–15 % solved XOR; the others stall
on plateaus with J = 1/4 (both hidden units dead: a constant output), 1/6 or 1/8 (a unit dead on some
inputs, whose ReLU gradient is exactly 0 there, so nothing moves it). tanh never has a zero gradient;
it solved 91–93 % of the same seeds, and each failure sat at J = 1/8 (one input off by 1/2). So the
script restarts from the next seed until one solves XOR (at most ``--restarts`` starts) and prints every
start, stuck or not. ``--activation relu`` shows the stuck starts.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

import numpy as np

import gpunn
from gpunn.commands import Parser, UsageError, device_name, no_matplotlib, run_command
from gpunn.commands import device as cli_device
from gpunn.files import display_path

PROG = "xor.py"
X_XOR = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # (4, 2), one input per row
Y_XOR = np.array([0.0, 1.0, 1.0, 0.0])
HAND_SET = {
    "W1": np.array([[1.0, 1.0], [1.0, 1.0]]),  # (U_1, p) = (2, 2)
    "b1": np.array([0.0, -1.0]),
    "W2": np.array([[1.0, -2.0]]),  # (1, U_1)
    "b2": np.array([0.0]),
}
TOLERANCE = 0.1  # XOR counts as solved when every output is within this of its target


def hand_set_network(device) -> gpunn.MLP:
    """The lecture's 2-2-1 ReLU network with the weights above (float64, so outputs are exact)."""
    net = gpunn.MLP([2, 2, 1], activation="relu", task="regression", device=device, dtype="float64")
    net.load_state(HAND_SET)
    return net


def feature_map(net: gpunn.MLP, X=X_XOR):
    """(Z^(1), Q^(1), ŷ) on the host for inputs X (n, 2): the hidden pre-activations and features
    (n, 2), and the outputs (n,)."""
    out = net.forward(X)
    hidden = net.layers[0]
    return gpunn.to_numpy(hidden.Z), gpunn.to_numpy(hidden.Q), gpunn.to_numpy(out)[:, 0]


@dataclass
class Start:
    """One random start: its seed, final cost J, outputs ŷ (4,), and whether it solved XOR."""

    seed: int
    cost: float
    outputs: np.ndarray
    solved: bool
    net: gpunn.MLP


def train_once(device, seed: int, activation="tanh", iterations=2000, lr=0.1, momentum=0.9) -> Start:
    """Full-batch gradient descent with momentum from the initial θ of ``seed`` on the four XOR points."""
    net = gpunn.MLP(
        [2, 2, 1], activation=activation, task="regression", device=device, seed=seed, dtype="float64"
    )
    opt = gpunn.SGD(net, lr=lr, momentum=momentum)
    X, y = net.inputs(X_XOR), net.targets(Y_XOR, 4)
    for _ in range(iterations):
        _, grads = gpunn.backprop(net, X, y)
        opt.step(grads)
    J, _ = net.loss(X, y)
    outputs = gpunn.to_numpy(net.forward(X))[:, 0]
    solved = bool(np.all(np.abs(outputs - Y_XOR) < TOLERANCE))
    return Start(seed, float(J), outputs, solved, net)


def train_xor(device, seed=0, restarts=10, **kwargs) -> list[Start]:
    """Starts from seeds seed, seed + 1, … until one solves XOR or ``restarts`` starts were made.
    Returns every start; the last one solved XOR if any did."""
    starts = []
    for k in range(restarts):
        starts.append(train_once(device, seed + k, **kwargs))
        if starts[-1].solved:
            break
    return starts


# --- the command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="The lecture's hand-set ReLU network for XOR, then a 2-2-1 network trained on XOR.",
    )
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", type=Path, default=Path("runs/lecture"), help="folder for xor_feature_space.png")
    p.add_argument("--seed", type=int, default=0, help="seed of the first random start")
    p.add_argument(
        "--activation",
        choices=["tanh", "relu", "sigmoid"],
        default="tanh",
        help="hidden activation of the trained network",
    )
    p.add_argument("--restarts", type=int, default=10, help="random starts at most")
    p.add_argument("--iterations", type=int, default=2000, help="gradient steps per start")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate γ")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum μ")
    p.add_argument("--quick", action="store_true", help="smoke test: 1000 iterations per start")
    return p


def _fmt(values, sep="  ") -> str:
    return sep.join(f"{v:6.3f}" for v in np.round(values, 3) + 0.0)  # + 0.0 turns -0.0 into 0.0


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, build_parser().parse_args, _run, argv)


def _run(args) -> int:
    if args.restarts < 1 or args.iterations < 1 or not args.lr > 0 or not 0 <= args.momentum < 1:
        raise UsageError("--restarts and --iterations must be >= 1, --lr > 0, --momentum in [0, 1)")
    iterations = 1000 if args.quick else args.iterations
    device = cli_device(PROG, args.device)
    args.out.mkdir(parents=True, exist_ok=True)

    net = hand_set_network(device)
    Z, Q, y = feature_map(net)
    print("Hand-set ReLU network of the lecture: W(1) = [[1, 1], [1, 1]], b(1) = (0, -1), W(2) = (1, -2),")
    print("b(2) = 0; hidden pre-activations z, features q = max(0, z) and outputs y for the four inputs:")
    print(" x1  x2 |  z1  z2 |  q1  q2 |   y  target")
    for x, z, q, out, t in zip(X_XOR, Z, Q, y, Y_XOR):
        row = f"{x[0]:3.0f} {x[1]:3.0f} | {z[0]:3.0f} {z[1]:3.0f} | {q[0]:3.0f} {q[1]:3.0f}"
        print(f"{row} | {out:3.0f} {t:5.0f}")
    if np.array_equal(Q[1], Q[2]):
        print(f"(0,1) and (1,0) both map to q = ({Q[1, 0]:g},{Q[1, 1]:g}): in feature space the line")
        print("q1 - 2 q2 = 1/2 separates the classes, while no line separates them in the input space.")
    print("Outputs:", " ".join(f"{v:g}" for v in y))

    print(
        f"\nTrained 2-2-1 network: {args.activation} hidden units, linear output, squared error, full-batch\n"
        f"gradient descent with γ = {args.lr}, momentum {args.momentum}, {iterations} iterations per start"
    )
    starts = train_xor(
        device,
        args.seed,
        args.restarts,
        activation=args.activation,
        iterations=iterations,
        lr=args.lr,
        momentum=args.momentum,
    )
    for k, s in enumerate(starts, start=1):
        verdict = "solved" if s.solved else "not solved (stuck in a local minimum or not converged)"
        print(f"  start {k} (seed {s.seed}): J = {s.cost:.3g}, outputs {_fmt(s.outputs)}: {verdict}")
    _plot(args.out / "xor_feature_space.png", Q, starts[-1])
    last = starts[-1]
    if not last.solved:
        print(
            f"{PROG}: error: none of {len(starts)} random starts solved XOR with {args.activation} units; "
            f"try more --restarts or --iterations",
            file=sys.stderr,
        )
        return 1
    _, q_trained, _ = feature_map(last.net)
    print(f"Solved with seed {last.seed} after {len(starts)} start(s); its hidden features q for the inputs:")
    for x, q in zip(X_XOR, q_trained):
        print(f"  x = ({x[0]:.0f}, {x[1]:.0f}) -> q = ({_fmt(q, ', ')})")
    return 0


def _plot(path: Path, Q: np.ndarray, trained: Start) -> None:
    """Input space, the hand-set network's feature space, and the trained network's features."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        no_matplotlib(PROG, path.name)
        return
    _, q_trained, _ = feature_map(trained.net)
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    panels = (
        ("input space x", X_XOR, ("x1", "x2")),
        ("feature space q (hand-set ReLU)", Q, ("q1", "q2")),
        (f"feature space q (trained, seed {trained.seed})", q_trained, ("q1", "q2")),
    )
    for ax, (title, P, labels) in zip(fig.subplots(1, 3), panels):
        for cls, colour, marker in ((0, "tab:blue", "o"), (1, "tab:red", "x")):
            pts = P[Y_XOR == cls]
            ax.scatter(pts[:, 0], pts[:, 1], c=colour, marker=marker, s=80, label=f"y = {cls}")
        labels_at: list[tuple] = []  # inputs that land on (nearly) the same point share one label
        for x, p in zip(X_XOR, P):
            name = f"({x[0]:.0f},{x[1]:.0f})"
            near = [g for g in labels_at if np.hypot(*(g[0] - p)) < 0.05]
            if near:
                near[0][1].append(name)
            else:
                labels_at.append((p, [name]))
        for p, inputs in labels_at:
            ax.annotate(" ".join(inputs), p, textcoords="offset points", xytext=(6, 6), fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        ax.margins(0.25)
        ax.grid(alpha=0.3)
    ax = fig.axes[1]
    q1 = np.linspace(-0.2, 2.2, 2)
    ax.plot(q1, (q1 - 0.5) / 2, "k--", lw=1, label="q1 − 2 q2 = 1/2")
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, format="png", dpi=100)
    print(f"{PROG}: wrote {display_path(path)}")


if __name__ == "__main__":
    sys.exit(main())
