"""The optimizer room: our large-batch optimizers LARS (You et al. 2017) and LAMB (You et al., ICLR 2020),
extrapolated SGD (Lin et al., ICML 2020; :mod:`swap.optim.extrap`), and building any phase's optimizer
and decay groups from the config or the user's function (:mod:`swap.optim.build`). AdamW and SGD are
torch's (``torch.optim``)."""
from .build import build_optimizer, param_groups, user_optimizer
from .lamb import LAMB
from .lars import LARS

__all__ = ["LARS", "LAMB", "build_optimizer", "param_groups", "user_optimizer"]
