"""A tiny, offline-trained tokenizer and the PixelRefer chat template.

Tests and `pixelrefer_hf.testing` need a tokenizer that behaves like the Qwen2 tokenizer of the released checkpoints
(byte-level BPE, ChatML turn markers, `<image>` and `<REGION>` as single special tokens) without downloading
anything. `build_tiny_tokenizer` trains one in a few milliseconds on a short built-in corpus; training is
deterministic, so two calls give the same vocabulary and merges.

This module is not remote code: it is never copied into a checkpoint folder.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<REGION>"

# Order fixes the ids: 0 pad, 1 im_start, 2 im_end, 3 image, 4 region.
SPECIAL_TOKENS = [PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN, IMAGE_TOKEN, REGION_TOKEN]

# Qwen2-style ChatML without a default system prompt (the released PixelRefer template inserts none).
# Content may be a plain string or a list of blocks: an image block renders as "<image>\n", a video block as
# "<video>\n" (the processor expands both), a text block as its text. Assistant answers and their <|im_end|> sit
# inside {% generation %} so that `return_assistant_tokens_mask=True` (TRL `assistant_only_loss`) marks exactly them.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}"
    "{%- set ns = namespace(text=message['content']) -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\n' -%}"
    "{%- elif block['type'] == 'video' -%}{%- set ns.text = ns.text + '<video>\n' -%}"
    "{%- elif block['type'] == 'text' -%}{%- set ns.text = ns.text + block['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ns.text + '<|im_end|>' -}}{%- endgeneration -%}{{- '\n' -}}"
    "{%- else -%}"
    "{{- ns.text + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

_COLOURS = "red green blue yellow black white orange purple pink brown gray grey golden silver dark light"
_SHAPES = "square circle triangle rectangle box line dot star ring cross oval stripe block shape"
_POSITIONS = "left right up down top bottom center centre middle above below next near far behind front corner edge"
_NUMBERS = "0 1 2 3 4 5 6 7 8 9 10 11 12 one two three four five six seven eight nine ten first second third"
_TEMPLATES = [
    "What is {region}?",
    "What is the {colour} {shape} on the {position}?",
    "Describe {region} in detail.",
    "Please describe the {shape} in the image in detail.",
    "There is a {colour} {shape} at the {position} of the image.",
    "The {shape} is {colour} and it is {position} the {other}.",
    "Is the {shape} {colour}? Yes, it is. No, it is not.",
    "Which object is on the {position}: the {shape} or the {other}?",
    "How many {shape}s are there? There are {number}.",
    "Time {number}.0s: the {colour} {shape} moves {position}.",
    "At time {number} the object moves {position} and then {other_position}.",
    "There are {number} regions in the video: region {number} and object {number}.",
    "The answer is yes. The answer is no. Left or right? Up or down?",
    "A small {colour} {shape} next to a big {other} near the {position} edge.",
]


def _training_corpus() -> list[str]:
    """A deterministic list of a few hundred short English sentences about colours, shapes and positions."""
    colours, shapes, positions = _COLOURS.split(), _SHAPES.split(), _POSITIONS.split()
    numbers = _NUMBERS.split()
    corpus = [_COLOURS, _SHAPES, _POSITIONS, _NUMBERS, "yes no Yes No What Describe Time Which How Please"]
    for i, template in enumerate(_TEMPLATES):
        for j in range(24):
            k = i * 24 + j
            corpus.append(
                template.format(
                    region=f"the {colours[k % len(colours)]} region",
                    colour=colours[k % len(colours)],
                    shape=shapes[(k * 7) % len(shapes)],
                    other=shapes[(k * 3 + 1) % len(shapes)],
                    position=positions[(k * 5) % len(positions)],
                    other_position=positions[(k * 11 + 2) % len(positions)],
                    number=numbers[(k * 13) % len(numbers)],
                )
            )
    return corpus


def build_tiny_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer offline and wrap it for `transformers`.

    Args:
        vocab_size (`int`, *optional*, defaults to 600):
            Target vocabulary size including the 256 byte symbols and the special tokens. The trainer stops early
            when the corpus has no pair left to merge: the built-in corpus gives 561 tokens.

    Returns:
        `PreTrainedTokenizerFast`: pad `<|endoftext|>` on the left (what batched `generate` needs; the training
        collator asks for right padding itself), eos `<|im_end|>`, no bos, and the extra special tokens
        `<|im_start|>`, `<image>`, `<REGION>` (ids 0-4 in `SPECIAL_TOKENS` order). Any text round-trips through
        `encode`/`decode` because every byte has a symbol.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=IM_END_TOKEN,
        padding_side="left",
        extra_special_tokens=[IM_START_TOKEN, IMAGE_TOKEN, REGION_TOKEN],
    )


__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_tokenizer"]
