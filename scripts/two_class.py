"""``python scripts/two_class.py``: the lecture's Figure 5.4, a 2-2-1 network on a synthetic two-class
problem, against the Bayes-optimal boundary of the densities that generated the data.

Data: class y = 1 and y = 0 each with prior 1/2 and a known density, chosen so that the best boundary is
a rounded corner that two hidden units can bend a line into, and no single line can follow:

    p(x | y = 0) = (1/3) Σ_k N(x; m_k, 0.5² I),  m_k = (−0.9, 0.9), (0.9, −0.9), (−0.9, −0.9)
    p(x | y = 1) = N(x; (0.8, 0.8), [[0.35, −0.1], [−0.1, 0.35]])

Network: p = 2 inputs, U = 2 tanh hidden units, one output through the logistic sigmoid (gpunn's task
"binary": one logit z^(2), g = σ(z^(2)) the probability of class 1, binary cross-entropy
``gpunn.losses.sigmoid_cross_entropy``), trained by full-batch gradient descent with momentum on
``--n-train`` points and tested on fresh points from the same densities.

Figure: the training data, the network's decision boundary y = 0.5 (red, where σ(z^(2)) = 1/2, i.e. the
logit is 0), the Bayes-optimal boundary p(x | 1) = p(x | 0) (green), and, dashed blue, for each hidden
unit the contour where its *output* equals 0.5. The caption's "z = 0.5" comes from a notation where z
names the hidden unit's output (its activation); in the lecture's notation that is q_j = h(z_j) =
tanh(z_j) = 0.5, the straight line W_j^(1) x + b_j^(1) = artanh(0.5) ≈ 0.549.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

import numpy as np

import gpunn
from gpunn.commands import Parser, UsageError, device_name, no_matplotlib, run_command
from gpunn.commands import device as cli_device
from gpunn.files import display_path

PROG = "two_class.py"
LIMITS = (-2.5, 2.5)  # the square the figure shows


@dataclass(frozen=True)
class Mixture:
    """A Gaussian mixture density in R²: weights (K,), means (K, 2), covariances (K, 2, 2)."""

    weights: tuple
    means: tuple
    covs: tuple

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n points (n, 2) drawn from the mixture."""
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        X = np.empty((n, 2))
        for j, (mean, cov) in enumerate(zip(self.means, self.covs)):
            rows = k == j
            X[rows] = mean + rng.standard_normal((rows.sum(), 2)) @ np.linalg.cholesky(cov).T
        return X

    def logpdf(self, X: np.ndarray) -> np.ndarray:
        """ln p(x) for each row of X (n, 2), (n,)."""
        parts = []
        for w, mean, cov in zip(self.weights, self.means, self.covs):
            cov = np.asarray(cov)
            D = X - np.asarray(mean)
            maha = np.einsum("ij,jk,ik->i", D, np.linalg.inv(cov), D)
            parts.append(np.log(w) - 0.5 * maha - 0.5 * np.log(np.linalg.det(2 * np.pi * cov)))
        return np.logaddexp.reduce(np.stack(parts), axis=0)


_ISO = ((0.25, 0.0), (0.0, 0.25))
CLASS_0 = Mixture((1 / 3, 1 / 3, 1 / 3), ((-0.9, 0.9), (0.9, -0.9), (-0.9, -0.9)), (_ISO, _ISO, _ISO))
CLASS_1 = Mixture((1.0,), ((0.8, 0.8),), (((0.35, -0.1), (-0.1, 0.35)),))
PRIOR_1 = 0.5


def make_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(X (n, 2), y (n,) in {0, 1}) drawn from the joint: y ~ Bernoulli(PRIOR_1), then x ~ p(x | y)."""
    y = (rng.random(n) < PRIOR_1).astype(float)
    X = np.empty((n, 2))
    X[y == 0] = CLASS_0.sample(rng, int((y == 0).sum()))
    X[y == 1] = CLASS_1.sample(rng, int((y == 1).sum()))
    return X, y


def bayes_log_odds(X: np.ndarray) -> np.ndarray:
    """ln p(y = 1 | x) / p(y = 0 | x) from the true densities, (n,); the Bayes classifier says 1 where > 0."""
    return np.log(PRIOR_1) + CLASS_1.logpdf(X) - np.log(1 - PRIOR_1) - CLASS_0.logpdf(X)


def bayes_predict(X: np.ndarray) -> np.ndarray:
    return (bayes_log_odds(X) > 0).astype(float)


def accuracy(net: gpunn.MLP, X: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(gpunn.to_numpy(net.predict(X)) == y))


@dataclass
class Result:
    """The trained network, its training data and final cost, and fresh test data."""

    net: gpunn.MLP
    X: np.ndarray
    y: np.ndarray
    cost: float
    X_test: np.ndarray
    y_test: np.ndarray

    @property
    def accuracies(self) -> dict:
        """Accuracy of the network and of the Bayes classifier on the training and the test data."""
        return {
            "net_train": accuracy(self.net, self.X, self.y),
            "bayes_train": float(np.mean(bayes_predict(self.X) == self.y)),
            "net_test": accuracy(self.net, self.X_test, self.y_test),
            "bayes_test": float(np.mean(bayes_predict(self.X_test) == self.y_test)),
        }


def fit(device="cpu", seed=0, n_train=200, n_test=20000, iterations=5000, lr=0.5, momentum=0.9) -> Result:
    """Draw the data of ``seed``, and train the 2-2-1 tanh/sigmoid network (initial θ from ``seed`` too)."""
    rng = np.random.default_rng(seed)
    X, y = make_data(rng, n_train)
    X_test, y_test = make_data(rng, n_test)
    net = gpunn.MLP([2, 2, 1], activation="tanh", task="binary", device=device, seed=seed, dtype="float64")
    opt = gpunn.SGD(net, lr=lr, momentum=momentum)
    Xd, yd = net.inputs(X), net.targets(y, n_train)
    for _ in range(iterations):
        _, grads = gpunn.backprop(net, Xd, yd)
        opt.step(grads)
    J, _ = net.loss(Xd, yd)
    cost = float(J)
    if not np.isfinite(cost):
        raise gpunn.DivergenceError(f"training diverged (cost {cost}); try a smaller --lr")
    return Result(net, X, y, cost, X_test, y_test)


# --- the command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Figure 5.4: a 2-2-1 network (tanh hidden units, sigmoid output) on two Gaussian-mixture "
        "classes, with the Bayes-optimal boundary.",
    )
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", type=Path, default=Path("runs/lecture"), help="folder for fig5_4_two_class.png")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and the initial weights")
    p.add_argument("--n-train", type=int, default=200, help="training points")
    p.add_argument("--n-test", type=int, default=20000, help="fresh test points to compare with Bayes")
    p.add_argument("--iterations", type=int, default=5000, help="full-batch gradient steps")
    p.add_argument("--lr", type=float, default=0.5, help="learning rate γ")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum μ")
    p.add_argument("--quick", action="store_true", help="smoke test: 300 iterations, 2000 test points")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, build_parser().parse_args, _run, argv)


def _run(args) -> int:
    if min(args.n_train, args.n_test, args.iterations) < 1 or not args.lr > 0 or not 0 <= args.momentum < 1:
        raise UsageError("--n-train, --n-test, --iterations must be >= 1, --lr > 0, --momentum in [0, 1)")
    iterations = 300 if args.quick else args.iterations
    n_test = 2000 if args.quick else args.n_test
    device = cli_device(PROG, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = fit(device, args.seed, args.n_train, n_test, iterations, args.lr, args.momentum)
    seconds = time.perf_counter() - started
    acc = result.accuracies
    print(
        f"2-2-1 network (tanh hidden units, sigmoid output), binary cross-entropy, {args.n_train} training "
        f"points, full-batch gradient descent: γ = {args.lr}, momentum {args.momentum}, {iterations} "
        f"iterations ({seconds:.1f} s); final cost {result.cost:.4f}"
    )
    print("                      network   Bayes-optimal")
    print(f"  training accuracy   {100 * acc['net_train']:6.2f} %  {100 * acc['bayes_train']:6.2f} %")
    print(
        f"  test accuracy       {100 * acc['net_test']:6.2f} %  {100 * acc['bayes_test']:6.2f} %"
        f"   ({n_test} fresh points)"
    )
    _plot(args.out / "fig5_4_two_class.png", result)
    return 0


def _plot(path: Path, result: Result) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        no_matplotlib(PROG, path.name)
        return
    g = np.linspace(*LIMITS, 301)
    G1, G2 = np.meshgrid(g, g)
    grid = np.column_stack([G1.ravel(), G2.ravel()])
    logit = gpunn.to_numpy(result.net.forward(grid))[:, 0].reshape(G1.shape)  # y = 0.5 where logit = 0
    Q = gpunn.to_numpy(result.net.layers[0].Q)  # hidden outputs q_j = tanh(z_j), (m, 2)
    bayes = bayes_log_odds(grid).reshape(G1.shape)

    fig = Figure(figsize=(6.4, 7), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    X, y = result.X, result.y
    ax.scatter(*X[y == 1].T, marker="x", c="tab:red", s=22, lw=1, label="class 1")
    ax.scatter(*X[y == 0].T, marker="o", facecolors="none", edgecolors="tab:blue", s=22, label="class 0")

    def contour(values, colour, style, width):
        if values.min() < 0 < values.max():  # a level outside the data would only draw a warning
            ax.contour(G1, G2, values, levels=[0], colors=colour, linestyles=style, linewidths=width)

    for j in range(Q.shape[1]):
        contour(Q[:, j].reshape(G1.shape) - 0.5, "tab:blue", "dashed", 1.2)
    contour(logit, "tab:red", "solid", 2)
    contour(bayes, "tab:green", "solid", 2)
    acc = result.accuracies
    handles = ax.get_legend_handles_labels()[0] + [
        Line2D([], [], color="tab:blue", ls="--", label="hidden units: $q_j = 0.5$"),
        Line2D([], [], color="tab:red", lw=2, label=f"network, y = 0.5 ({100 * acc['net_test']:.1f} %)"),
        Line2D([], [], color="tab:green", lw=2, label=f"Bayes-optimal ({100 * acc['bayes_test']:.1f} %)"),
    ]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1),
        ncol=2,
        fontsize=8,
        title="test accuracy in ( )",
        title_fontsize=8,
    )
    ax.set_xlim(*LIMITS)
    ax.set_ylim(*LIMITS)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title("Figure 5.4: 2-2-1 network (tanh, sigmoid output)")
    fig.savefig(path, format="png", dpi=100)
    print(f"{PROG}: wrote {display_path(path)}")


if __name__ == "__main__":
    sys.exit(main())
