"""Ask a question about a region of an image with PixelRefer or PixelRefer-Lite.

    python examples/quickstart.py                              # tiny random model: runs offline, answers are noise
    python examples/quickstart.py --variant pixelrefer-lite    # the Object-Only framework
    python examples/quickstart.py --model PATH_OR_REPO         # a saved or converted checkpoint (remote code)

The region can be a binary mask, a box `[x0, y0, x1, y1]` in pixels, or a COCO RLE dict; the question refers to it
with `<region>`.
"""

import argparse

import numpy as np
import torch
from transformers import AutoModel, AutoProcessor


def make_image() -> tuple[np.ndarray, np.ndarray]:
    """A grey 160x200 picture with a red disc and a blue square, and the disc's mask."""
    image = np.full((160, 200, 3), 200, dtype=np.uint8)
    yy, xx = np.mgrid[:160, :200]
    disc = (yy - 60) ** 2 + (xx - 60) ** 2 <= 30**2
    image[disc] = (220, 30, 30)
    image[90:140, 120:170] = (30, 30, 220)
    return image, disc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or hub repo; default: a tiny random model")
    parser.add_argument("--variant", default="pixelrefer", choices=["pixelrefer", "pixelrefer-lite"])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    # Model
    if args.model:
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    else:
        from pixelrefer_hf.testing import tiny_model_and_processor

        print("No --model given: using a tiny random model, so the answers below are meaningless.")
        model, processor = tiny_model_and_processor(args.variant)

    # Inputs: one image, two regions (a mask and a box), one question about each, batched.
    image, disc_mask = make_image()
    questions = ["What is <region>?", "What color is <region>?"]
    regions = [[disc_mask], [[120, 90, 170, 140]]]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for question in questions
    ]
    inputs = processor(
        text=prompts, images=[image, image], regions=regions, padding=True, padding_side="left", return_tensors="pt"
    )

    # Generation
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for question, answer in zip(questions, answers):
        print(f"Q: {question}\nA: {answer.strip()}\n")


if __name__ == "__main__":
    main()
