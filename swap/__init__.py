"""swap: large-batch training that still generalizes.

SWAP (Gupta, Akle Serrano, DeCoste, ICLR 2020) and its baselines as a library and a CLI::

    import swap
    model, summary = swap.train_swap(make_model, (x_train, y_train), (x_test, y_test),
                                     {"workers": 4, "phase1": {"batch_size": 1024}})

Building blocks: :func:`average_models`, :func:`average_state_dicts`, :func:`recompute_bn`,
:func:`warmup_decay`, :func:`cyclic`, :func:`train` (one loop; the update is an :class:`UpdateStep`
such as :class:`SGDStep`, every watcher a :class:`Callback`), :func:`evaluate`, :class:`Task` (loss and metrics), :class:`Loader`,
:class:`ExtrapSGD` (extrapolated SGD, Lin et al. 2020), :class:`EMA` and :class:`LAWA` (averages along
one trajectory, as loop callbacks), :func:`top_eigenvalues` and
:func:`hutchinson_trace` (Hessian), :class:`BatchSizeRule` and :func:`fgsm` (ABS/ABSA, Yao et al. 2018).
"""
from .adversarial import fgsm
from .algorithms.adaptive_batch import BatchSizeRule
from .optim.extrap import ExtrapSGD
from .api import train_sgd, train_swap
from .averaging import average_models, average_state_dicts, bn_buffer_names, recompute_bn
from .callbacks import Callback
from .config import Config, SwapError, load_config
from .hessian import hutchinson_trace, top_eigenvalues
from .data import Augment, ImageDataset, Loader, load_dataset
from .models import build_model, resnet9, small_cnn
from .schedules import cyclic, warmup_decay
from .task import Task
from .train import SGDStep, UpdateStep, evaluate, train
from .trajectory import EMA, LAWA

__version__ = "0.1.0"
__all__ = ["train_swap", "train_sgd", "ExtrapSGD", "BatchSizeRule", "fgsm", "top_eigenvalues", "hutchinson_trace",
           "average_models", "average_state_dicts", "bn_buffer_names", "recompute_bn",
           "Config", "SwapError", "load_config", "Augment", "ImageDataset", "Loader", "load_dataset",
           "build_model", "resnet9", "small_cnn", "cyclic", "warmup_decay", "evaluate", "train",
           "SGDStep", "UpdateStep", "Task", "Callback", "EMA", "LAWA"]
