"""msr-loss: interventional contrastive losses against non-semantic confounders."""

from msr_loss.functional import (
    barlow_twins,
    info_nce,
    interventional_loss,
    non_semantic_logits,
    nt_xent,
)
from msr_loss.losses import InfoNCELoss, InterventionalLoss, NonSemanticContrastiveLoss, NTXentLoss
from msr_loss.meta import MetaUpdate
from msr_loss.metamask import DimensionalMask, MetaMaskLoss, MetaMaskModel, MetaMaskUpdate
from msr_loss.negatives import patch_negatives, synthesize_texture_folder, texture_negatives
from msr_loss.regularizers import MetaSemanticRegularizer
from msr_loss.virtual_step import VirtualAdam, VirtualLARS, VirtualSGD

__all__ = [
    "DimensionalMask",
    "InfoNCELoss",
    "InterventionalLoss",
    "MetaMaskLoss",
    "MetaMaskModel",
    "MetaMaskUpdate",
    "MetaSemanticRegularizer",
    "MetaUpdate",
    "NTXentLoss",
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
