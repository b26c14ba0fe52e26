"""Prompt layout for the Qwen-VL families: one user turn (images first, then the question and the answer-format
instruction) rendered by the tokenizer's chat template, and `<|image_pad|>` expanded to one token per merged patch.

The chat template is the checkpoint's own (its tokenizer carries it); a model built from a config gets its family's
(`families/`, written with `qwen_chat_template`). The Qwen processors cannot be constructed without torchvision
(their video processors), so the expansion the processor would do is done here: each image contributes
grid_t·grid_h·grid_w / merge_size² pad tokens.
"""
from __future__ import annotations

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
IMAGE_PAD = "<|image_pad|>"
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
# what `chat_prompt` writes: a tokenizer without one of these cannot encode the prompts (checked at load)
REQUIRED_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", IMAGE_PAD]
SYSTEM_PROMPT = "You are a helpful assistant."
FORMAT_INSTRUCTION = ("First think about the question inside <think> </think> tags, "
                      "then give the final answer inside \\boxed{}.")


def chat_messages(question: str, num_images: int = 1) -> list[dict]:
    """One user turn: the images, then the question and the answer-format instruction."""
    return [{"role": "user", "content": [*({"type": "image"} for _ in range(num_images)),
                                         {"type": "text", "text": f"{question} {FORMAT_INSTRUCTION}"}]}]


def chat_prompt(tokenizer, question: str, num_images: int = 1) -> str:
    """The chat text of one user turn with images first (one `<|image_pad|>` each), ending where the assistant
    starts, as the tokenizer's chat template writes it."""
    return tokenizer.apply_chat_template(chat_messages(question, num_images), tokenize=False,
                                         add_generation_prompt=True)


def qwen_chat_template(default_system: str | None) -> str:
    """The Qwen chat template for text and images (Jinja, as tokenizers carry it): `<|im_start|>role\n…<|im_end|>\n`
    turns, each image as `<|vision_start|><|image_pad|><|vision_end|>`, and `default_system` as a system turn when
    the conversation has none (Qwen2.5-VL's template adds "You are a helpful assistant."; Qwen3-VL's adds none)."""
    system = ("{%- if messages[0]['role'] != 'system' -%}{{- '<|im_start|>system\\n" + default_system
              + "<|im_end|>\\n' -}}{%- endif -%}") if default_system else ""
    return (system + "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
            "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
            "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{- '" + VISION_BLOCK + "' -}}"
            "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the VISION_TOKENS the tokenizer has, to suppress in generation (a sampled `<|image_pad|>` would
    claim image features that do not exist).  Tokens it lacks cannot be generated, so they are left out —
    some checkpoints' tokenizers have no `<|vision_pad|>`."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in VISION_TOKENS if token in vocab]


def expand_image_pads(text: str, tokens_per_image: list[int]) -> str:
    """Replace the i-th `<|image_pad|>` with tokens_per_image[i] copies; the count must match exactly."""
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != len(tokens_per_image):
        raise ValueError(f"prompt has {len(pieces) - 1} {IMAGE_PAD} placeholders but {len(tokens_per_image)} images")
    out = [pieces[0]]
    for count, rest in zip(tokens_per_image, pieces[1:]):
        out.append(IMAGE_PAD * count + rest)
    return "".join(out)
