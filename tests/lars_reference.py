"""A LARS with the parameter groups and the update of solo-learn main's ``solo.utils.lars.LARS``.

solo-learn 1.0.2 (what the test environment installs) ships only ``LARSWrapper``; this stand-in
follows the documented update of the later ``LARS`` class, so that its mirroring can be tested.
"""

import torch


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        eta=1e-3,
        eps=1e-8,
        clip_lars_lr=False,
        exclude_bias_n_norm_lars=False,
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "eta": eta,
            "eps": eps,
            "clip_lars_lr": clip_lars_lr,
            "exclude_bias_n_norm_lars": exclude_bias_n_norm_lars,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            decay, momentum = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                scaled = p.ndim != 1 or not group["exclude_bias_n_norm_lars"]
                p_norm, g_norm = p.norm(), p.grad.norm()
                if scaled and p_norm != 0 and g_norm != 0:
                    ratio = group["eta"] * p_norm / (g_norm + p_norm * decay + group["eps"])
                    if group["clip_lars_lr"]:
                        ratio = min(ratio / group["lr"], 1)
                    update = (update + decay * p) * ratio
                if momentum != 0:
                    state = self.state[p]
                    if "momentum_buffer" in state:
                        buffer = state["momentum_buffer"]
                        buffer.mul_(momentum).add_(update, alpha=1 - group["dampening"])
                    else:
                        buffer = state["momentum_buffer"] = update.clone()
                    update = update + momentum * buffer if group["nesterov"] else buffer
                p.add_(update, alpha=-group["lr"])
