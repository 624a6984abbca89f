"""The `trajectory` column of a candidates table (D3PO): one image's sampling trajectory as `.npz` bytes.

`prefpipe generate --trajectories` writes it; the D3PO recipe reads it. Arrays:

    latents     (T+1, C, h, w) float16   x_T first, x_0 last
    timesteps   (T,) int64               the step from latents[k] to latents[k+1] is at timesteps[k]
    eta         ()  float32              DDIM eta
    guidance    ()  float32              classifier-free guidance scale at sampling
"""

from __future__ import annotations

import io

import numpy as np


def encode_trajectory(latents, timesteps, eta: float, guidance: float) -> bytes:
    """One image's sampling trajectory as compressed `.npz` bytes (see the module docstring)."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        latents=np.asarray(latents, dtype=np.float16),
        timesteps=np.asarray(timesteps, dtype=np.int64),
        eta=np.float32(eta),
        guidance=np.float32(guidance),
    )
    return buf.getvalue()


def decode_trajectory(data: bytes) -> dict:
    """The arrays of :func:`encode_trajectory` (numpy). Never unpickles: object arrays are refused."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
