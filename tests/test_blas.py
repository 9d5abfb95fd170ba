"""gemm_accumulate, the fused C ← C + αAB that folds plain SGD into backprop on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from gpunn import blas


def test_numpy_blas_is_found_here():
    # NumPy's wheels carry OpenBLAS; if this fails, CPU steps quietly take the two-pass form.
    assert blas.available()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["CCC", "FCC", "CFC", "CCF", "FFF"])
def test_gemm_accumulate_matches_numpy(rng, dtype, layout, monkeypatch):
    monkeypatch.setattr(blas, "SMALL", 0)  # take the BLAS call even for these small matrices
    A = rng.standard_normal((7, 5)).astype(dtype)
    B = rng.standard_normal((5, 9)).astype(dtype)
    C = rng.standard_normal((7, 9)).astype(dtype)
    A, B, C = (np.asarray(x, order=o) for x, o in zip((A, B, C), layout))
    want = C + (-0.75) * (A @ B)
    blas.gemm_accumulate(A, B, C, -0.75)
    np.testing.assert_allclose(C, want, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_transposed_views_as_backprop_passes_them(rng, monkeypatch):
    monkeypatch.setattr(blas, "SMALL", 0)
    dZ = rng.standard_normal((100, 20)).astype(np.float32)  # (n, U)
    Q = rng.standard_normal((100, 30)).astype(np.float32)  # (n, U_prev)
    W = np.asfortranarray(rng.standard_normal((20, 30)).astype(np.float32))  # a column-major W view
    want = W - dZ.T @ Q
    blas.gemm_accumulate(dZ.T, Q, W, -1.0)
    np.testing.assert_allclose(W, want, rtol=1e-5, atol=1e-5)


def test_falls_back_where_blas_cannot(rng, monkeypatch):
    monkeypatch.setattr(blas, "SMALL", 0)
    A, B = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    C = rng.standard_normal((3, 2))
    strided = np.zeros((3, 4))[:, ::2]  # neither C- nor Fortran-ordered
    strided[...] = C
    want = C + 2.0 * (A @ B)
    blas.gemm_accumulate(A, B, strided, 2.0)
    np.testing.assert_allclose(strided, want)
    monkeypatch.setattr(blas, "_gemm", None)
    monkeypatch.setattr(blas, "_searched", True)
    assert not blas.available()
    blas.gemm_accumulate(A, B, C, 2.0)
    np.testing.assert_allclose(C, want)
