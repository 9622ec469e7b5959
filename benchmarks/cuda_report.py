"""The README's GPU design record: per optimizer kernel, bytes moved per element, launches per
step, registers per thread (ptxas, sm_90, float32, flat buffer) and the time a step implies on an
H100 (3.35 TB/s) for 1e8 float32 parameters, if memory-bound.

    python benchmarks/cuda_report.py        # needs /usr/local/cuda (ptxas), no GPU
"""

from fastdl.kernels import batchnorm_cuda, cudalib, optim_cuda  # noqa: F401  (registers)

H100_BYTES_PER_SECOND = 3.35e12
N = 1e8

# (kernel, variant, bytes per float32 element): each state buffer is read and written (8),
# the parameter too (8), the gradient read (4); EMA weights add 8, grad_stats reads g (4).
ROWS = [
    ("sgd_update_cuda", "SGD", 12),
    ("sgd_update_cuda", "SGD, momentum", 20),
    ("momentum_update_cuda", "Momentum", 20),
    ("rmsprop_update_cuda", "RMSprop", 20),
    ("rmsprop_update_cuda", "RMSprop, centered + momentum", 36),
    ("adam_update_cuda", "Adam / AdamW", 28),
    ("adam_update_cuda", "Adam / AdamW, amsgrad", 36),
    ("adam_update_cuda", "Adam / AdamW + EMA weights", 36),
    ("grad_stats_cuda", "+ clipping or non-finite skipping", 4),
]


def main():
    registers = {}
    for name, (dispatcher, signatures) in cudalib.REGISTRY.items():
        ptx = cudalib.compile_ptx(dispatcher, signatures[0], (9, 0))  # float32, flat
        registers[name] = cudalib.ptxas(ptx, (9, 0))[0]
    print("| step | kernel | bytes / element | launches / step (flat; n separate arrays) | "
          "registers / thread | H100, 1e8 float32 |")
    print("|---|---|---:|---|---:|---:|")
    for name, variant, nbytes in ROWS:
        launches = "1; ceil(n / 32)"
        milliseconds = nbytes * N / H100_BYTES_PER_SECOND * 1e3
        print(f"| {variant} | `{name}` | {nbytes} | {launches} | {registers[name]} | "
              f"{milliseconds:.2f} ms |")


if __name__ == "__main__":
    main()
