"""`PixelReferDataCollator`: region-chat rows -> a padded training batch with assistant-only labels.

Works with TRL's `SFTTrainer` (pass it as `data_collator`, with `remove_unused_columns=False` so the `regions` column
survives) and with a plain `torch.utils.data.DataLoader`. This module is not remote code.
"""

import re
from collections.abc import Sequence

import torch
from transformers.utils import logging

from .data import IMAGE_TAG, ROLES, VIDEO_TAG, row_regions
from .media_io import load_image
from .processing_pixelrefer import REGION_PLACEHOLDER, check_region_placeholders

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
# A visual tag with the newline after it: the chat template writes that newline itself after a media block.
_TAG_PATTERN = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})\n?")
# The processor names the sample by its position in the call; in a one-sample call that is always "sample 0".
_SINGLE_SAMPLE_PREFIX = re.compile(r"^sample 0(?::|,) ?")


class PixelReferDataCollator:
    r"""
    Turn a list of region-chat rows (see `pixelrefer_hf.data`) into model inputs with `labels`.

    Per row it opens the image or the video frames, decodes the region RLEs, renders the conversation with the
    processor's chat template and runs the processor on the whole batch (right padding). `labels` equal `input_ids` on
    the assistant answers and their `<|im_end|>` (the template's `{% generation %}` spans) and are -100 on the prompt,
    on `<image>` / `<REGION>` tokens and on padding.

    A bad row (placeholder count different from its regions, an RLE that does not decode, a missing or unreadable
    image file, an empty conversation or one without an answer, a region the processor rejects, or a row that does not
    fit in `max_length` without cutting through visual or region tokens, or without losing its whole answer) raises a
    `ValueError` naming the row by its `index_column` value (its batch position when the column is absent). With
    `skip_bad_samples=True` such rows are dropped from the batch and counted in a warning instead; a batch in which
    every row is bad still raises, because training on nothing is never what was meant.

    Args:
        processor ([`PixelReferProcessor`]): the model's processor.
        skip_bad_samples (`bool`, *optional*, defaults to `False`): drop bad rows (with a warning) instead of raising.
        max_length (`int`, *optional*): truncate longer rows from the right, as long as only text is cut; `None`
            keeps every row whole.
        index_column (`str`, *optional*, defaults to `"id"`): the row field that names a row in errors.
        pad_to_multiple_of (`int`, *optional*): pad the sequence length to a multiple of this (tensor cores).

    Attributes:
        num_skipped (`int`): rows skipped so far by this collator (in this process).
    """

    def __init__(
        self,
        processor,
        skip_bad_samples: bool = False,
        max_length: int | None = None,
        index_column: str = "id",
        pad_to_multiple_of: int | None = None,
    ):
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive integer or None, got {max_length}")
        self.processor = processor
        self.skip_bad_samples = skip_bad_samples
        self.max_length = max_length
        self.index_column = index_column
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_skipped = 0

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PixelReferDataCollator got an empty batch")
        prepared, failures = [], []
        for position, row in enumerate(rows):
            name = self._name(row, position)
            try:
                prepared.append({"name": name, **self._prepare(row)})
            except ValueError as error:
                self._fail(failures, name, str(error))

        batch = None
        if prepared:
            try:
                batch = self._encode(prepared)
            except ValueError:
                # Some row fails only once the processor sees it (an empty crop, a too long row, ...): find which by
                # encoding the rows one at a time, then encode the good ones together.
                good = []
                for sample in prepared:
                    try:
                        self._encode([sample])
                        good.append(sample)
                    except ValueError as error:
                        self._fail(failures, sample["name"], _SINGLE_SAMPLE_PREFIX.sub("", str(error)))
                batch = self._encode(good) if good else None

        if failures:
            details = "; ".join(f"{name}: {reason}" for name, reason in failures)
            if batch is None:
                raise ValueError(f"every sample of the batch is bad ({len(failures)} of {len(rows)}): {details}")
            self.num_skipped += len(failures)
            logger.warning(
                f"PixelReferDataCollator skipped {len(failures)} of {len(rows)} samples of this batch "
                f"({self.num_skipped} so far): {details}"
            )
        return batch

    # ------------------------------------------------------------------------------------------------------------

    def _name(self, row: dict, position: int) -> str:
        value = row.get(self.index_column) if isinstance(row, dict) else None
        return f"dataset sample {value!r}" if value is not None else f"batch sample {position}"

    def _fail(self, failures: list[tuple[str, str]], name: str, reason: str) -> None:
        if not self.skip_bad_samples:
            raise ValueError(f"{name}: {reason}")
        failures.append((name, reason))

    def _prepare(self, row: dict) -> dict:
        """Validate one row and build its chat-template conversation (media in content blocks) and regions."""
        if not isinstance(row, dict):
            raise ValueError(f"a row must be a dict, got {type(row).__name__}")
        messages = row.get("messages")
        if messages is None or (isinstance(messages, (list, tuple)) and not messages):
            raise ValueError("the conversation is empty")
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"'messages' must be a list of {{role, content}} turns, got {type(messages).__name__}")
        frames = row.get("frames")
        frames = [] if frames is None else frames
        if not isinstance(frames, (list, tuple)):
            raise ValueError(f"'frames' must be a list of images, got {type(frames).__name__}")
        image = row.get("image")
        if image is not None and frames:
            raise ValueError("the row has both an image and video frames")
        if frames:
            media = {"type": "video", "video": [load_image(f, f"frame {t}") for t, f in enumerate(frames)]}
        elif image is not None:
            media = {"type": "image", "image": load_image(image, "image")}
        else:
            media = None
        regions = row_regions(row)

        texts, num_tags = [], 0
        conversation = []
        for k, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"turn {k} must be a dict with a role and a content, got {type(message).__name__}")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(f"turn {k} must have a role system / user / assistant and a string content")
            # System turns open the conversation; then user and assistant alternate, the user first. A row that
            # breaks this would train answers to questions it never asked.
            if role == "system" and all(turn["role"] == "system" for turn in conversation):
                expected_role = "system"
            else:
                expected_role = "assistant" if conversation and conversation[-1]["role"] == "user" else "user"
            if role != expected_role:
                raise ValueError(
                    f"turn {k} is a {role!r} turn where a {expected_role!r} turn belongs (after optional system turns, "
                    "user and assistant turns alternate, starting with the user)"
                )
            if role == "assistant" and (REGION_PLACEHOLDER in content or _TAG_PATTERN.search(content)):
                raise ValueError(f"turn {k}: an assistant answer cannot hold {REGION_PLACEHOLDER} or visual tags")
            texts.append(content)
            blocks = []
            for piece_index, piece in enumerate(_TAG_PATTERN.split(content)):
                if piece_index % 2 == 1:  # a captured tag
                    expected = VIDEO_TAG if frames else IMAGE_TAG
                    if media is None or piece != expected or num_tags:
                        raise ValueError(f"turn {k}: the {piece} tag does not match the row's media (or repeats)")
                    blocks.append(media)
                    num_tags += 1
                elif piece:
                    blocks.append({"type": "text", "text": piece})
            conversation.append({"role": role, "content": blocks})
        if not any(message["role"] == "assistant" for message in conversation):
            raise ValueError("the conversation has no assistant turn, so nothing would be trained")
        check_region_placeholders("", texts, len(regions))
        if media is not None and not num_tags:
            # Official convention: the visual block opens the first user turn when the text does not place it.
            first_user = next((m for m in conversation if m["role"] == "user"), None)
            if first_user is None:
                raise ValueError("the row has media but no user turn to attach it to")
            first_user["content"].insert(0, media)
        timestamps = None
        if frames:
            try:
                timestamps = [float(t) for t in row.get("timestamps") or []]
            except (TypeError, ValueError) as error:
                raise ValueError(f"'timestamps' must be a list of numbers, one per frame: {error}") from error
        return {"conversation": conversation, "regions": regions, "timestamps": timestamps}

    def _encode(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """Run the processor on prepared rows and build `labels` from the chat template's assistant mask."""
        truncate = self.max_length is not None
        processor_kwargs = {
            "regions": [sample["regions"] for sample in samples],
            "padding": True,
            "padding_side": "right",
            "truncation": truncate,
            "max_length": self.max_length,
            "pad_to_multiple_of": self.pad_to_multiple_of,
        }
        if any(sample["timestamps"] is not None for sample in samples):
            processor_kwargs["video_timestamps"] = [sample["timestamps"] for sample in samples]
        encoded = self.processor.apply_chat_template(
            [sample["conversation"] for sample in samples],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors="pt",
            processor_kwargs=processor_kwargs,
        )
        assistant_mask = encoded.pop("assistant_masks").bool() & encoded["attention_mask"].bool()
        num_answer_tokens = assistant_mask.sum(-1)
        if bool((num_answer_tokens == 0).any()):
            index = int(torch.nonzero(num_answer_tokens == 0)[0])
            raise ValueError(
                f"sample {index}: no answer token is left after truncation to max_length={self.max_length}; raise "
                "max_length or shorten the prompt"
            )
        # Answers never hold <image> / <REGION> (checked in `_prepare`), so the mask alone decides the labels.
        data = dict(encoded)
        data["labels"] = encoded["input_ids"].masked_fill(~assistant_mask, IGNORE_INDEX)
        return data


__all__ = ["IGNORE_INDEX", "PixelReferDataCollator"]
