"""Build the small byte-level BPE tokenizer shipped in papo_engine/assets/tokenizer/ (run once; output committed).

It carries Qwen2.5-VL's special tokens so prompts are laid out exactly as for the real model, and a
vocabulary trained on the generated tasks plus general maths/English text so arbitrary text still encodes.
"""
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from papo_engine.data import COLORS, SHAPES, question_texts
from transformers.utils.chat_template_utils import render_jinja_template

from papo_engine.families.qwen2_5_vl import FAMILY as QWEN2_5_VL
from papo_engine.prompts import QWEN_SPECIAL_TOKENS, SYSTEM_PROMPT, chat_messages

OUT = Path(__file__).resolve().parents[1] / "papo_engine" / "assets" / "tokenizer"
VOCAB_SIZE = 1024

GENERAL = """The answer is 12. Let me think step by step. First we count the objects, then we compare.
What is the area of the triangle? The radius of the circle is 3 cm, so the area is 9 pi.
Choose the correct option: (A) 1/2 (B) 0.5 (C) 2 (D) none of these. x = -4.25, y = 7, z = 3/4.
\\frac{1}{2} + \\sqrt{3} \\times 2 = ? The left side, the right side, the top, the bottom, the middle.
How many shapes are in the image? There are two red circles and one blue square on the right.
"""


def corpus():
    lines = [GENERAL, SYSTEM_PROMPT]
    for q in question_texts():
        prompt = render_jinja_template([chat_messages(q)], chat_template=QWEN2_5_VL.chat_template,
                                       add_generation_prompt=True)[0][0]
        lines.append(prompt.replace("<|image_pad|>", " "))
    for c in COLORS:
        for s in SHAPES:
            lines.append(f"<think>I see a {s}.</think>\\boxed{{{c}}} The {s} is {c}.")
        lines.append(f"<think>I see {s}s.</think>")
    for k in range(0, 21):
        lines.append(f"<think>I count {k} shapes.</think>\\boxed{{{k}}}")
    return lines * 20


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(QWEN_SPECIAL_TOKENS), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS
                                                           if t not in ("<|im_end|>", "<|endoftext|>")]})
    fast.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    print(f"wrote {OUT} with {len(fast)} tokens")


if __name__ == "__main__":
    main()
