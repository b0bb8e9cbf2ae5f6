"""Processor for PixelRefer and PixelRefer-Lite: images / videos / regions + text -> model inputs.

The processor expands every placeholder into exactly the tokens the model will fill (design doc, "Text expansion"):

* `<image>` (one tag per image) -> `<image>` x visual tokens of that image (PixelRefer);
* `<video>` -> `Time 0.0s:<image>...,Time 1.0s:<image>...` with the tokens each frame keeps after compression;
* `<region>` (one per region, in order) -> `[<REGION>...]`, or `[Time t:<REGION>...,Time t:<REGION>...]` for every
  Lite video region (and, with `multi_frame_regions=True`, a PixelRefer region given on several video frames);
* PixelRefer-Lite never feeds global visual tokens, so it removes `<image>` / `<video>` tags instead.
"""

import re
from collections.abc import Sequence

from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import TensorType

from .image_processing_pixelrefer import PixelReferSample, PixelReferSampleLayout

# What users write for each region, in order; the processor expands it into object tokens.
REGION_PLACEHOLDER = "<region>"
# A visual tag with the newline that may follow it (Lite removes both), or a region placeholder.
_PLACEHOLDER_PATTERN = re.compile(r"(?P<tag><image>|<video>)(?P<newline>\n?)|<region>")


def check_region_placeholders(where: str, texts: str | Sequence[str], num_regions: int) -> None:
    """The rule of every entry point (processor, pipeline, training rows): the text (or the user turns of a
    conversation) holds exactly one `<region>` per region, in order. `where` names the sample, item or row."""
    texts = [texts] if isinstance(texts, str) else texts
    num_placeholders = sum(text.count(REGION_PLACEHOLDER) for text in texts)
    if num_placeholders != num_regions:
        raise ValueError(
            f"{where + ': ' if where else ''}the text has {num_placeholders} {REGION_PLACEHOLDER} placeholder(s) "
            f"but {num_regions} region(s) were given"
        )


class PixelReferProcessor(ProcessorMixin):
    r"""
    Constructs a PixelRefer processor from a [`PixelReferImageProcessor`] and a Qwen2-style tokenizer whose
    vocabulary holds `<image>` and `<REGION>` as special tokens.

    Args:
        image_processor ([`PixelReferImageProcessor`]):
            Processes images, video frames and regions; its `variant` decides how the text is expanded.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The language model's tokenizer.
        chat_template (`str`, *optional*):
            Jinja template of [`~ProcessorMixin.apply_chat_template`]. It must render an `{"type": "image"}` block as
            `<image>\n` and a `{"type": "video"}` block as `<video>\n` (`tokenizer_assets.CHAT_TEMPLATE` does).
    """

    image_token = "<image>"
    region_token = "<REGION>"
    region_placeholder = REGION_PLACEHOLDER
    video_tag = "<video>"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
        self.image_token_id = self._single_token_id(tokenizer, self.image_token)
        self.region_token_id = self._single_token_id(tokenizer, self.region_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @staticmethod
    def _single_token_id(tokenizer, token: str) -> int:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if (
            token_id is None
            or token_id == tokenizer.unk_token_id
            or tokenizer.encode(token, add_special_tokens=False) != [token_id]
        ):
            raise ValueError(f"the tokenizer must hold {token} as a single special token")
        return token_id

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))

    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        videos=None,
        regions: list | None = None,
        video_timestamps: list | None = None,
        multi_frame_regions: bool | None = None,
        padding: bool | str = False,
        padding_side: str | None = None,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | TensorType | None = None,
        add_special_tokens: bool = False,
        return_offsets_mapping: bool = False,
        return_text_replacement_offsets: bool = False,
        audio=None,
    ) -> BatchFeature:
        r"""
        Prepare a batch of samples for the model.

        Args:
            text (`str` or `list[str]`, *optional*):
                One prompt or a batch. Each sample's text holds one `<region>` per region; an `<image>` tag per image
                (or one `<video>` tag) marks where the visual tokens go, and `<image>\n` per image (`<video>\n`) is
                prepended when the text has no tag. `None` returns the visual tensors only.
            images (*optional*):
                Per sample `None`, an image, or a list of images (PIL, numpy HWC, torch CHW/HWC). With a single `str`
                text, the sample's image or list of images.
            videos (*optional*):
                Per sample `None` or one video: a list of frames or a 4-D array/tensor (a one-element list holding
                the video is also accepted). A sample has images or a video, not both.
            regions (*optional*):
                Per sample a list of regions in `<region>` order (with a single `str` text, that sample's list). Image
                sample: a mask, box `[x0, y0, x1, y1]` or COCO RLE (`{"image_index": i, "region": r}` when the sample
                has several images). Video sample: a dict `{frame_index: mask | box | rle}`.
            video_timestamps (*optional*):
                Per sample the seconds of each video frame. Defaults to the frame index (frames sampled at 1 fps).
            multi_frame_regions (`bool`, *optional*):
                PixelRefer: accept video regions given on several frames (timed form); defaults to the image
                processor's `multi_frame_regions` (see [`PixelReferImageProcessor`]).
            padding, padding_side, truncation, max_length, pad_to_multiple_of:
                As for the tokenizer. `truncation=None` does not truncate. Truncation that would remove an `<image>`
                or `<REGION>` token raises a `ValueError` naming the sample instead of silently corrupting it.
            return_tensors (`str` or [`~utils.TensorType`], *optional*):
                `"pt"` for torch tensors.
            add_special_tokens (`bool`, *optional*, defaults to `False`):
                Whether the tokenizer adds its special tokens (chat-template prompts already hold them).
            return_offsets_mapping, return_text_replacement_offsets (`bool`, *optional*, defaults to `False`):
                Character offsets of the tokens / of the placeholder replacements, used by
                `apply_chat_template(..., return_assistant_tokens_mask=True)`.
            audio:
                Accepted for `ProcessorMixin.apply_chat_template`; must be `None`.

        Returns:
            [`BatchFeature`]: `input_ids`, `attention_mask` and the image processor's tensors (see
            `docs/design.md`, "Processor output"; keys that do not apply to the batch are left out).
        """
        if audio is not None:
            raise ValueError("PixelRefer does not take audio inputs")
        is_single = isinstance(text, str)
        texts = [text] if is_single else text
        if texts is not None and not (isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts)):
            raise ValueError("text must be a string or a list of strings")

        batch_size = self._batch_size(texts, images, videos)
        images = self._per_sample(images, batch_size, "images", is_single, nested_ok=True)
        videos = self._per_sample(videos, batch_size, "videos", is_single, nested_ok=True)
        regions = self._per_sample(regions, batch_size, "regions", is_single, nested_ok=False)
        video_timestamps = self._per_sample(
            video_timestamps, batch_size, "video_timestamps", is_single, nested_ok=False
        )

        samples = [
            self._prepare_sample(
                i,
                None if texts is None else texts[i],
                images[i],
                videos[i],
                regions[i],
                video_timestamps[i],
                multi_frame_regions,
            )
            for i in range(batch_size)
        ]
        visual_inputs, layouts = {}, []
        if any(sample.frames for sample in samples):
            visual_inputs, layouts = self.image_processor.process_samples(samples, return_tensors=None)
        if texts is None:
            return BatchFeature(dict(visual_inputs), tensor_type=return_tensors)

        expanded, replacement_offsets = [], []
        for i, (sample_text, sample) in enumerate(zip(texts, samples, strict=True)):
            layout = layouts[i] if layouts else None
            new_text, offsets = self._expand_text(sample_text, sample, layout)
            expanded.append(new_text)
            replacement_offsets.append(offsets)

        truncate = truncation not in (None, False, "do_not_truncate")
        if truncate:
            self._check_truncation(expanded, max_length, add_special_tokens)
        text_inputs = self.tokenizer(
            expanded,
            padding=padding,
            padding_side=padding_side,
            truncation=truncation if truncate else False,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=return_offsets_mapping,
        )
        data = {**text_inputs, **visual_inputs}
        if return_text_replacement_offsets:
            data["text_replacement_offsets"] = replacement_offsets
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"])

    # ------------------------------------------------------------------------------------------------------------
    # Batch structure
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _batch_size(texts: list[str] | None, images, videos) -> int:
        if texts is not None:
            return len(texts)
        for value in (images, videos):
            if value is not None:
                return len(value) if isinstance(value, (list, tuple)) else 1
        raise ValueError("give text, images or videos")

    @staticmethod
    def _per_sample(value, batch_size: int, name: str, is_single: bool, nested_ok: bool) -> list:
        """One entry per sample.

        With a single `str` text the argument is that sample's entry; `images` / `videos` may also come in the batched
        one-element form `[entry]` that `apply_chat_template` produces (`nested_ok`).
        """
        if value is None:
            return [None] * batch_size
        if is_single:
            is_batched = (
                nested_ok
                and isinstance(value, (list, tuple))
                and len(value) == 1
                and (value[0] is None or isinstance(value[0], (list, tuple)))
            )
            return list(value) if is_batched else [value]
        if not isinstance(value, (list, tuple)):
            if batch_size == 1 and nested_ok:
                return [value]
            raise ValueError(f"{name} must be a list with one entry per sample")
        if len(value) != batch_size:
            raise ValueError(f"{name} has {len(value)} entries but the batch has {batch_size} samples")
        return list(value)

    # ------------------------------------------------------------------------------------------------------------
    # Per-sample validation: the one place that decides whether a sample is well formed
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_sample(
        self, index: int, text: str | None, images, video, regions, video_timestamps, multi_frame_regions: bool | None
    ) -> PixelReferSample:
        """Validate one sample (text and visual inputs) and normalise its visual inputs; every error names it."""
        where = f"sample {index}"
        if text is not None:
            max_chars = getattr(self.image_processor, "max_prompt_chars", None)
            if max_chars is not None and len(text) > max_chars:
                raise ValueError(
                    f"{where}: the text has {len(text)} characters, more than max_prompt_chars={max_chars} "
                    "(an image processor option)"
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(
                    f"{where}: the text is not valid unicode ({error.reason} at character {error.start})"
                ) from error
            if self.region_token in text:
                raise ValueError(
                    f"{where}: the text already holds {self.region_token} tokens; write one "
                    f"{self.region_placeholder} per region instead"
                )
            num_regions = len(regions) if isinstance(regions, (list, tuple)) else 0 if regions is None else 1
            check_region_placeholders(where, text, num_regions)
        sample = self.image_processor.prepare_sample(index, images, video, regions, video_timestamps)
        self.check_region_frames(
            where, [[frame for frame, _ in frames] for frames in sample.regions], multi_frame_regions
        )
        if text is not None:
            self._check_visual_tags(where, text, sample)
        return sample

    def check_region_frames(self, where: str, region_frames: list[list[int]], multi_frame_regions: bool | None) -> None:
        """PixelRefer takes each video region on one frame unless `multi_frame_regions` (default: the image
        processor's option); `region_frames` holds per region the indices of the frames it is given on."""
        if multi_frame_regions is None:
            multi_frame_regions = self.image_processor.multi_frame_regions
        if self.image_processor.is_lite or multi_frame_regions:
            return
        for region_index, frames in enumerate(region_frames):
            if len(frames) > 1:
                raise ValueError(
                    f"{where}, region {region_index}: given on frames {sorted(frames)}, but PixelRefer takes each "
                    "region on one frame (the official prompt; its released weights never saw a region on several "
                    "frames). Give the region on one frame, or pass multi_frame_regions=True (processor call or image "
                    "processor option) for the timed multi-frame form `[Time t:<REGION>...,...]`, which "
                    "PixelRefer-Lite uses as released"
                )

    def _check_visual_tags(self, where: str, text: str, sample: PixelReferSample) -> None:
        num_image_tags, num_video_tags = text.count(self.image_token), text.count(self.video_tag)
        if sample.is_video:
            if num_image_tags:
                raise ValueError(
                    f"{where}: the text has {self.image_token} tags but the sample holds a video; use one "
                    f"{self.video_tag} tag"
                )
            if num_video_tags > 1:
                raise ValueError(f"{where}: the text has {num_video_tags} {self.video_tag} tags but one video")
        elif sample.frames:
            if num_video_tags:
                raise ValueError(f"{where}: the text has a {self.video_tag} tag but the sample holds images")
            if num_image_tags not in (0, len(sample.frames)):
                raise ValueError(
                    f"{where}: the text has {num_image_tags} {self.image_token} tags but {len(sample.frames)} images "
                    "were given"
                )
        elif num_image_tags or num_video_tags:
            raise ValueError(
                f"{where}: the text has {self.image_token} / {self.video_tag} tags but no image or video was given"
            )

    # ------------------------------------------------------------------------------------------------------------
    # Text expansion
    # ------------------------------------------------------------------------------------------------------------

    def _expand_text(
        self, text: str, sample: PixelReferSample, layout: PixelReferSampleLayout | None
    ) -> tuple[str, list[dict]]:
        """Expand one sample's tags and placeholders.

        Returns the new text and, per replacement, `{"type", "span", "new_span", "text", "replacement"}` in the
        format of `ProcessorMixin.get_text_with_replacements` (spans in the original and in the new text).
        """
        is_lite = self.image_processor.is_lite
        pieces, offsets = [], []
        shift = 0  # length of the new text minus the original, up to the current position

        def record(kind: str, start: int, end: int, replacement: str) -> None:
            nonlocal shift
            offsets.append(
                {
                    "type": kind,
                    "span": (start, end),
                    "new_span": (start + shift, start + shift + len(replacement)),
                    "text": text[start:end],
                    "replacement": replacement,
                }
            )
            shift += len(replacement) - (end - start)

        has_media = bool(sample.frames)
        tag = self.video_tag if sample.is_video else self.image_token
        if has_media and not is_lite and tag not in text:
            # Official behaviour: the visual block comes first when the prompt does not place it.
            num_tags = 1 if sample.is_video else len(sample.frames)
            prefix = "".join(self._visual_tokens(layout, k) + "\n" for k in range(num_tags))
            record("video" if sample.is_video else "image", 0, 0, prefix)
            pieces.append(prefix)

        last, tag_index, region_index = 0, 0, 0
        for match in _PLACEHOLDER_PATTERN.finditer(text):
            pieces.append(text[last : match.start()])
            if match.group("tag"):
                # Lite drops the tag and its newline: its images never reach the LLM.
                replacement = "" if is_lite else self._visual_tokens(layout, tag_index) + match.group("newline")
                tag_index += 1
                kind = "video" if match.group("tag") == self.video_tag else "image"
            else:
                replacement = self._region_tokens(layout, region_index, sample.is_video)
                region_index += 1
                kind = "region"
            record(kind, match.start(), match.end(), replacement)
            pieces.append(replacement)
            last = match.end()
        pieces.append(text[last:])
        return "".join(pieces), offsets

    def _visual_tokens(self, layout: PixelReferSampleLayout, index: int) -> str:
        """`<image>` tokens of image `index`, or the timestamped frames of the sample's video."""
        if layout.is_video:
            return ",".join(
                f"Time {timestamp:.1f}s:" + self.image_token * count
                for timestamp, count in zip(layout.frame_timestamps, layout.visual_token_counts, strict=True)
            )
        return self.image_token * layout.visual_token_counts[index]

    def _region_tokens(self, layout: PixelReferSampleLayout, index: int, is_video: bool) -> str:
        counts = layout.region_token_counts[index]
        if not is_video or (len(counts) == 1 and not self.image_processor.is_lite):
            # PixelRefer writes no time for a region given on a single frame (official behaviour).
            return "[" + "".join(self.region_token * count for count in counts) + "]"
        # Official Lite format: `round(t, 1)` without a unit.
        timestamps = layout.region_timestamps[index]
        groups = [
            f"Time {round(t, 1)}:" + self.region_token * count for t, count in zip(timestamps, counts, strict=True)
        ]
        return "[" + ",".join(groups) + "]"

    def _check_truncation(self, texts: list[str], max_length: int | None, add_special_tokens: bool) -> None:
        """Raise when truncation would remove `<image>` or `<REGION>` tokens (the model could not fill them)."""
        limit = max_length if max_length is not None else self.tokenizer.model_max_length
        token_ids = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        protected = {self.image_token_id, self.region_token_id}
        for index, ids in enumerate(token_ids):
            if len(ids) <= limit:
                continue
            removed = ids[limit:] if self.tokenizer.truncation_side == "right" else ids[: len(ids) - limit]
            if protected.intersection(removed):
                raise ValueError(
                    f"sample {index}: truncating its {len(ids)} tokens to max_length={limit} would cut through "
                    f"{self.image_token} / {self.region_token} tokens; raise max_length, lower the image "
                    "processor's max_visual_tokens, or shorten the sample"
                )


__all__ = ["PixelReferProcessor"]
