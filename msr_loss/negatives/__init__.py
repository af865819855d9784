"""Non-semantic negatives (Ge et al., NeurIPS 2021): images that keep the texture, not the object.

- :func:`patch_negatives` (:mod:`msr_loss.negatives.patch`): batched and on the images' device,
  built on the fly, one per query view and call.
- :func:`texture_negatives` / :func:`synthesize_texture_folder`
  (:mod:`msr_loss.negatives.texture`): offline texture images by patch quilting.

The loss term is :func:`msr_loss.non_semantic_logits` and
:class:`msr_loss.NonSemanticContrastiveLoss`: each query gets its own negatives as extra columns
``alpha * cos(q, t) / tau``, merged into its negatives' log-sum-exp through the
``extra_negative_logits`` argument of :func:`msr_loss.info_nce` and
:func:`msr_loss.interventional_loss`.

Encode the negatives like the host method's keys: with the momentum (key) encoder under
``torch.no_grad()`` where there is one (MoCo, BYOL), as in the paper; otherwise (SimCLR) with the
same encoder as the queries, with gradients, as SimCLR's own negatives.
"""

from msr_loss.negatives.patch import PATCH_RANGE, patch_negatives
from msr_loss.negatives.texture import IMAGE_SUFFIXES, synthesize_texture_folder, texture_negatives

__all__ = [
    "IMAGE_SUFFIXES",
    "PATCH_RANGE",
    "patch_negatives",
    "synthesize_texture_folder",
    "texture_negatives",
]
