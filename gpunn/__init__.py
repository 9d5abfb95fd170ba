"""gpunn: the neural networks of Lindholm et al., ch. 6, with hand-written backprop, on NumPy or CuPy.

import gpunn
dev = gpunn.get_device("auto")                       # "cpu" | "cuda" | "cuda:N" | "auto"
net = gpunn.MLP([784, 200, 10], device=dev, seed=0)  # W^(l) shaped (U_l, U_{l-1})
J, grads = gpunn.backprop(net, X, y)                 # Algorithm 6.1 on one mini-batch
gpunn.SGD(net, lr=0.5).step(grads)                   # (6.23)
"""

from .backend import Device, DeviceFallbackWarning, get_device, to_numpy
from .errors import CheckpointError, DataError, DeviceError, DivergenceError, GpunnError
from .layers import ACTIVATIONS, Dense
from .losses import sigmoid_cross_entropy, softmax_cross_entropy, squared_error
from .model import MLP, backprop
from .optim import SGD, Schedule

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "SGD",
    "CheckpointError",
    "DataError",
    "Dense",
    "Device",
    "DeviceError",
    "DeviceFallbackWarning",
    "DivergenceError",
    "GpunnError",
    "Schedule",
    "__version__",
    "backprop",
    "get_device",
    "sigmoid_cross_entropy",
    "softmax_cross_entropy",
    "squared_error",
    "to_numpy",
]
