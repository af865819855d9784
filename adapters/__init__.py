"""Framework adapters: ICL-MSR, non-semantic negatives and MetaMask as terms on solo-learn.

Importing this package needs only torch; solo-learn and Lightning are imported by
:func:`register` and by the ``msr-loss solo-pretrain`` launcher.
"""

from .flags import TERMS, register_term
from .metamask_term import MetaMaskFlags, MetaMaskTerm
from .msr_term import ICLMSRTerm, MSRFlags
from .nsneg_term import NonSemanticNegativesTerm, NSNegFlags
from .solo_learn import flags_from_config, register, solo_api, wrap_method
from .terms import AuxiliaryTerm, FlagBlock, StepContext

__all__ = [
    "TERMS",
    "AuxiliaryTerm",
    "FlagBlock",
    "ICLMSRTerm",
    "MSRFlags",
    "MetaMaskFlags",
    "MetaMaskTerm",
    "NSNegFlags",
    "NonSemanticNegativesTerm",
    "StepContext",
    "flags_from_config",
    "register",
    "register_term",
    "solo_api",
    "wrap_method",
]
