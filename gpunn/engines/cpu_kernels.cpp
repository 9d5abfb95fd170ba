// kernels.cu compiled for the CPU: the optional extension modules gpunn.engines._cpu_<REAL>_<INPUT> that
// setup.py builds (REAL, INPUT and MODULE set there). Each grid is one thread that loops over every
// element; the CPU engine loads the module's file with ctypes and calls the kernels it needs.
#include <Python.h>

#include <cmath>
using std::exp;
using std::log;
using std::log1p;
using std::sqrt;
using std::tanh;

struct gpunn_cpu_dim {
    long long x;
};
static const gpunn_cpu_dim threadIdx{0}, blockIdx{0}, blockDim{1}, gridDim{1};
#define __global__
#define __device__
#define __forceinline__ inline

#include "kernels.cu"

#define GPUNN_CAT(a, b) a##b
#define GPUNN_INIT(name) GPUNN_CAT(PyInit_, name)
#define GPUNN_STR(x) #x
#define GPUNN_NAME(x) GPUNN_STR(x)

static struct PyModuleDef gpunn_cpu_module = {PyModuleDef_HEAD_INIT, GPUNN_NAME(MODULE),
                                              "gpunn's CUDA kernels compiled for the CPU (see engines/blas.py)",
                                              -1, nullptr};

extern "C" PyMODINIT_FUNC GPUNN_INIT(MODULE)(void) { return PyModule_Create(&gpunn_cpu_module); }
