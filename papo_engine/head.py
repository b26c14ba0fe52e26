"""The lm_head as ONE module that either returns logits (generation) or runs the fused two-policy head.

Why a module and not a function call on `lm_head.weight`: under DeepSpeed ZeRO-3 the weight is partitioned
(shape (0,)) outside its own module's forward; ZeRO-3 gathers it around this module's forward and routes its
gradient back to the partition, so the fused op must run inside `FusedLMHead.forward`.
"""
from __future__ import annotations

from torch import nn

import papo_kernels


class FusedLMHead(nn.Linear):
    """nn.Linear(d, V, bias=False) with two extra modes, chosen by the arguments:

    head(h)                                 -> logits [.., V]                         (generate)
    head(h, targets=y)                      -> (logprobs, entropy)                    (single policy)
    head(h, targets=y, hidden_masked=h_m)   -> PapoHeadOutput(5 × [N])                (both branches)
    `fused=False` materializes the logits in eager torch instead (the reference for tests and benchmarks).
    """

    fused: bool = True
    backend: str = "auto"

    @classmethod
    def replace_in(cls, model, fused: bool, backend: str) -> "FusedLMHead":
        old = model.lm_head
        if old.bias is not None:
            raise ValueError("lm_head with a bias is not supported by the fused head")
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.in_features, head.out_features = old.in_features, old.out_features
        head.weight = old.weight  # the same Parameter: tying and state-dict names are unchanged
        head.register_parameter("bias", None)
        head.fused, head.backend = fused, backend
        model.lm_head = head
        return head

    def forward(self, hidden, targets=None, hidden_masked=None, temperature: float = 1.0):
        if targets is None:
            return super().forward(hidden)
        if hidden_masked is None:
            if self.fused:
                return papo_kernels.fused_logprob_entropy(hidden, self.weight, targets, temperature, self.backend)
            return papo_kernels.logprob_entropy_reference(hidden, self.weight, targets, temperature)
        if self.fused:
            return papo_kernels.fused_papo_head(hidden, hidden_masked, self.weight, targets, temperature,
                                                self.backend)
        return papo_kernels.papo_head_reference(hidden, hidden_masked, self.weight, targets, temperature)
