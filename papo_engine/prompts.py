"""Prompt layout for Qwen2.5-VL: the chat format, and `<|image_pad|>` expanded to one token per merged patch.

Qwen2_5_VLProcessor cannot be constructed without torchvision (its video processor), so the expansion the
processor would do is done here: each image contributes grid_t·grid_h·grid_w / merge_size² pad tokens.
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


def chat_prompt(question: str, num_images: int = 1, system: str = SYSTEM_PROMPT) -> str:
    """Qwen2.5-VL chat text for one user turn with images first, ending where the assistant starts."""
    images = VISION_BLOCK * num_images
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{images}{question} {FORMAT_INSTRUCTION}<|im_end|>\n"
            f"<|im_start|>assistant\n")


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
