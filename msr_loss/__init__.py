"""msr-loss: interventional contrastive losses against non-semantic confounders."""

from msr_loss.functional import info_nce, interventional_loss, nt_xent
from msr_loss.meta import MetaUpdate
from msr_loss.metamask import (
    DimensionalMask,
    MetaMaskLoss,
    MetaMaskModel,
    MetaMaskUpdate,
    barlow_twins,
)
from msr_loss.negatives import (
    NonSemanticContrastiveLoss,
    non_semantic_logits,
    patch_negatives,
    synthesize_texture_folder,
    texture_negatives,
)
from msr_loss.regularizers import MetaSemanticRegularizer
from msr_loss.virtual_step import VirtualAdam, VirtualLARS, VirtualSGD

__all__ = [
    "DimensionalMask",
    "MetaMaskLoss",
    "MetaMaskModel",
    "MetaMaskUpdate",
    "MetaSemanticRegularizer",
    "MetaUpdate",
    "NonSemanticContrastiveLoss",
    "VirtualAdam",
    "VirtualLARS",
    "VirtualSGD",
    "barlow_twins",
    "info_nce",
    "interventional_loss",
    "non_semantic_logits",
    "nt_xent",
    "patch_negatives",
    "synthesize_texture_folder",
    "texture_negatives",
]
__version__ = "0.1.0"
