"""Optimizers of our own: the large-batch optimizers LARS (You et al. 2017) and LAMB (You et al.,
ICLR 2020). AdamW and SGD are torch's (``torch.optim``)."""
from .lamb import LAMB
from .lars import LARS

__all__ = ["LARS", "LAMB"]
