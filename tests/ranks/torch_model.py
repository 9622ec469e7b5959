"""The network and data of the torch.distributed tests: Linear - BatchNorm1d - ReLU - Linear,
float32, global batches of 12 rows (rank_rows splits them)."""

import torch

STEPS = 4


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 4))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 8, generator=g) * 2 + 3, torch.randint(0, 4, (12,), generator=g))
            for _ in range(STEPS)]
