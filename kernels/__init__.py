"""fastdl's compiled kernels (installed as ``fastdl.kernels``).

Only compiled code and its launchers live here; validation and device dispatch live in the thin
API in ``fastdl``. Importing a kernel module imports numba, so ``fastdl`` imports them lazily.
"""
