"""Ask questions about regions of an image with PixelRefer or PixelRefer-Lite (model + processor + generate).

    python examples/quickstart.py                              # the bundled demo model (toy, synthetic shapes)
    python examples/quickstart.py --variant pixelrefer-lite    # its Object-Only (PixelRefer-Lite) twin
    python examples/quickstart.py --model PATH_OR_REPO         # a saved or converted checkpoint (remote code)

The region can be a binary mask, a box `[x0, y0, x1, y1]` in pixels, or a COCO RLE dict; the question refers to it
with `<region>`. The default image is `examples/assets/shapes.png`, the scene the demo models were made for.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from pixelrefer_hf.demo import demo_checkpoint

EXAMPLE_IMAGE = Path(__file__).parent / "assets" / "shapes.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or hub repo; default: the bundled demo model of --variant")
    parser.add_argument("--variant", default="pixelrefer", choices=["pixelrefer", "pixelrefer-lite"])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    # Model: any PixelRefer folder or repo loads the same way (the demo folder carries its remote code too).
    path = args.model or demo_checkpoint(args.variant)
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)

    # Inputs: one image, three questions (a box, a mask, and a box around a 12-pixel square), batched.
    image = np.array(Image.open(EXAMPLE_IMAGE).convert("RGB"))
    rows, cols = np.mgrid[: image.shape[0], : image.shape[1]]
    circle_mask = (rows + 0.5 - 150) ** 2 + (cols + 0.5 - 60) ** 2 <= 30**2  # the blue circle, centre (60, 150)
    questions = ["What is <region>?", "What shape is <region>?", "What is <region>?"]
    regions = [[[40, 40, 90, 90]], [circle_mask], [[180, 110, 192, 122]]]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for question in questions
    ]
    images = [image] * len(prompts)
    inputs = processor(text=prompts, images=images, regions=regions, padding=True, return_tensors="pt")

    # Generation
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for question, answer in zip(questions, answers):
        print(f"Q: {question}\nA: {answer.strip()}\n")


if __name__ == "__main__":
    main()
