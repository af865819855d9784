"""msr-loss: interventional contrastive losses against non-semantic confounders."""

from msr_loss.functional import info_nce, interventional_loss, nt_xent
from msr_loss.meta import MetaUpdate, VirtualSGD
from msr_loss.regularizers import MetaSemanticRegularizer

__all__ = [
    "MetaSemanticRegularizer",
    "MetaUpdate",
    "VirtualSGD",
    "info_nce",
    "interventional_loss",
    "nt_xent",
]
__version__ = "0.1.0"
