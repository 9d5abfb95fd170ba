"""gpunn: the neural networks of Lindholm et al., ch. 6, with hand-written backprop, on NumPy or CuPy.

import gpunn
dev = gpunn.get_device("auto")                       # "cpu" | "cuda" | "cuda:N" | "auto"
net = gpunn.MLP([784, 200, 10], device=dev, seed=0)  # W^(l) shaped (U_l, U_{l-1})
history = gpunn.fit(net, X, y, epochs=15, batch_size=100, lr=0.5, input_scale=1 / 255)
J, grads = gpunn.backprop(net, X, y)                 # Algorithm 6.1 on one mini-batch
gpunn.SGD(net, lr=0.5).step(grads)                   # (6.23)
net.save("model.npz"); net = gpunn.load("model.npz")
"""

__version__ = "0.2.0"

from .backend import Device, DeviceFallbackWarning, get_device, to_numpy
from .checkpoint import load
from .errors import (
    CheckpointError,
    DataError,
    DeviceError,
    DistributedError,
    DivergenceError,
    EngineFallbackWarning,
    GpunnError,
    RunFolderError,
    WriteError,
)
from .layers import ACTIVATIONS, Dense
from .losses import sigmoid_cross_entropy, softmax_cross_entropy, squared_error
from .model import MLP, backprop
from .optim import SGD, Adam, Schedule
from .train import Callback, History, fit

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "SGD",
    "Adam",
    "Callback",
    "CheckpointError",
    "DataError",
    "Dense",
    "Device",
    "DeviceError",
    "DeviceFallbackWarning",
    "DistributedError",
    "DivergenceError",
    "EngineFallbackWarning",
    "GpunnError",
    "History",
    "RunFolderError",
    "Schedule",
    "WriteError",
    "__version__",
    "backprop",
    "fit",
    "get_device",
    "load",
    "sigmoid_cross_entropy",
    "softmax_cross_entropy",
    "squared_error",
    "to_numpy",
]
