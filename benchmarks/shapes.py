"""The model shapes the CPU benchmarks run (one registry for rollout.py, throughput.py and vs_trl.py).

tiny, tiny-h128-l4, tiny-vocab152k: the default tiny model, a larger tiny body, and the tiny body with Qwen's
151,936-token vocabulary; every response runs to the same length there (min_new_tokens).

paper-mini: a real PAPO run's proportions scaled to a 2-core CPU (a step of a few seconds).
- Body : head multiply-adds per token 9.0 : 1, as a released Qwen2.5-VL-3B's 8.9 : 1 (36 layers of
  2048 → 2.77 G, head 2048 × 151,936 = 0.31 G): text hidden 256, 4 layers of 4 query heads of 64 and 2 KV heads,
  MLP 704 → 4 × 0.74 M = 2.95 M; the vocabulary shrinks with the width to 1,280 (head 0.33 M). Random weights:
  ids the 558-token tokenizer lacks decode to nothing, which a benchmark does not mind. The attention over the
  context adds 2 × 256 × context multiply-adds a layer, a larger share here (~0.1 M a layer at 200 tokens) than at
  3B (~5% of a layer at 750 tokens).
- Images whose visual tokens are most of the prompt: 336-px images, 144 visual tokens of a ~197-token prompt
  (a real run: up to 1,280 of ~1,400). The vision tower stays the tiny one (2 blocks of 48): its share of a step is
  far below a 3B model's.
- n = 5 responses to each of 8 prompts, with long-tailed lengths imposed per response key (rollout/lengths.py:
  log-normal, median 64 = ¼ of the cap 256, σ = 0.8: mean ~85, ~5% at the cap), the same for every system compared.
paper-mini-vocab152k: the same body, prompts and tail with the 151,936-token vocabulary (the head ~93% of a
token's multiply-adds), at 4 prompts and a cap of 128 (median 32) so that a step stays under ~20 s here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PAPER_BODY = ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=2",
              "model.intermediate_size=704", "data.image_size=336"]


@dataclass(frozen=True)
class Shape:
    overrides: list[str]
    prompts: int | None = None  # paper-mini: the work per step, and the imposed lengths
    n: int | None = None
    lengths: dict = field(default_factory=dict)  # LengthProfile(**lengths); cap = rollout.max_new_tokens

    def run_overrides(self) -> list[str]:
        """The shape's overrides plus, for a paper-mini shape, its prompts per step, n and response cap."""
        work = [] if self.prompts is None else [f"trainer.prompts_per_step={self.prompts}", f"rollout.n={self.n}",
                                                f"rollout.max_new_tokens={self.lengths['cap']}"]
        return [*self.overrides, *work]

    def length_profile(self):
        from papo_engine.rollout.lengths import LengthProfile
        return LengthProfile(**self.lengths) if self.lengths else None


SHAPES = {
    "tiny": Shape([]),
    "tiny-h128-l4": Shape(["model.hidden_size=128", "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=4",
                           "model.intermediate_size=384"]),
    "tiny-vocab152k": Shape(["model.architecture=tiny-vocab152k"]),
    "paper-mini": Shape([*PAPER_BODY, "model.vocab_size=1280"], prompts=8, n=5,
                        lengths=dict(median=64, cap=256, sigma=0.8, seed=0)),
    "paper-mini-vocab152k": Shape([*PAPER_BODY, "model.architecture=tiny-vocab152k"], prompts=4, n=5,
                                  lengths=dict(median=32, cap=128, sigma=0.8, seed=0)),
}
PAPER_MINI = ("paper-mini", "paper-mini-vocab152k")
