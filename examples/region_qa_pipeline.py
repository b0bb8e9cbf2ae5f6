"""Ask about regions of an image with `pipeline("region-qa")`: one question, a batch, every kind of region.

python examples/region_qa_pipeline.py                               # bundled demo model (synthetic shapes), offline
python examples/region_qa_pipeline.py --model PATH_OR_REPO          # a converted or trained checkpoint
python examples/region_qa_pipeline.py --image photo.jpg --box 40,30,200,180 --question "What is <region>?"
python examples/region_qa_pipeline.py --sam-model facebook/sam-vit-base --point 60,60   # a click, through SAM
"""

import argparse

import numpy as np
from transformers import pipeline


def make_image() -> tuple[np.ndarray, np.ndarray]:
    """A grey 160x200 picture with a red disc (2.2 times the area of the square) and a blue square, and the disc's
    mask."""
    image = np.full((160, 200, 3), 200, dtype=np.uint8)
    yy, xx = np.mgrid[:160, :200]
    disc = (yy - 60) ** 2 + (xx - 60) ** 2 <= 42**2
    image[disc] = (220, 30, 30)
    image[90:140, 120:170] = (30, 30, 220)
    return image, disc


def build_pipeline(model: str | None):
    if model:
        # A folder saved by the pipeline (or by `pixelrefer convert`) carries its code: this works without
        # pixelrefer_hf installed.
        return pipeline("region-qa", model=model, trust_remote_code=True)
    from pixelrefer_hf.demo import demo_checkpoint

    print("No --model given: using the bundled demo model, a toy that only knows synthetic coloured shapes.\n")
    return pipeline("region-qa", model=demo_checkpoint("pixelrefer"), trust_remote_code=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or hub repo; default: the bundled demo model")
    parser.add_argument("--image", help="an image file; default: a synthetic picture")
    parser.add_argument("--box", help="x0,y0,x1,y1 of the region to ask about (with --image)")
    parser.add_argument("--question", default="What is <region>?")
    parser.add_argument("--sam-model", help="SAM checkpoint that turns --point into a mask")
    parser.add_argument("--point", help="x,y of a click on the object (needs --sam-model)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    pipe = build_pipeline(args.model)
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": False}

    if args.image:
        box = [float(v) for v in args.box.split(",")] if args.box else [0, 0, 10**6, 10**6]
        print(args.question, "->", pipe(image=args.image, regions=[box], question=args.question, **options))
        return

    image, disc = make_image()
    # One question. The same call takes a PIL image or a local file path.
    print("single:", pipe(image=image, regions=[disc], question="What is <region>?", **options))

    # A batch: a mask, a box, a COCO-style polygon and two regions in one question, answered two at a time
    # (one left-padded `generate` call per pair).
    square_outline = [120, 90, 169, 90, 169, 139, 120, 139]  # COCO polygon: x0, y0, x1, y1, ...
    items = [
        {"image": image, "regions": [disc], "question": "What color is <region>?"},
        {"image": image, "regions": [[120, 90, 170, 140]], "question": "What shape is <region>?"},
        {"image": image, "regions": [{"polygons": [square_outline]}], "question": "What is <region>?"},
        {"image": image, "regions": [disc, [120, 90, 170, 140]], "question": "Is <region> larger than <region>?"},
        # A bad item: two placeholders, one region. With skip_bad_items it gets an error, the others still run.
        {"image": image, "regions": [disc], "question": "Is <region> larger than <region>?"},
    ]
    for item, result in zip(items, pipe(items, batch_size=2, skip_bad_items=True, **options), strict=True):
        print(f"{item['question']!r:40} -> {result}")

    if args.point:
        if not args.sam_model:
            parser.error("--point needs --sam-model")
        x, y = (float(v) for v in args.point.split(","))
        click = {"points": [[x, y]], "labels": [1]}
        print(
            "click:",
            pipe(image=image, regions=[click], question="What is <region>?", sam_model=args.sam_model, **options),
        )


if __name__ == "__main__":
    main()
