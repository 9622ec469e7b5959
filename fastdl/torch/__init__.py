"""fastdl's kernels inside PyTorch training loops (SPEC.md, "PyTorch adapter").

Change one import::

    import fastdl.torch as fdt
    model = fdt.patch(model)                       # BatchNorm*, Dropout, CrossEntropyLoss
    opt = fdt.AdamW(model.parameters(), lr=1e-3)   # a torch.optim.Optimizer

CPU tensors are read as NumPy views (no copy); CUDA tensors go through
``__cuda_array_interface__`` (untested: no GPU here). ``import fastdl`` alone never imports
torch; this module needs it (``pip install -e ".[torch]"``).
"""

from .nn import BatchNorm1d as BatchNorm1d
from .nn import BatchNorm2d as BatchNorm2d
from .nn import BatchNorm3d as BatchNorm3d
from .nn import CrossEntropyLoss as CrossEntropyLoss
from .nn import Dropout as Dropout
from .nn import SyncBatchNorm as SyncBatchNorm
from .nn import cross_entropy as cross_entropy
from .nn import patch as patch
from .optim import SGD as SGD
from .optim import Adam as Adam
from .optim import AdamW as AdamW
from .optim import Momentum as Momentum
from .optim import RMSprop as RMSprop
