"""Ask about an object in a video with `pipeline("region-qa")`: a region on one frame, or tracked on several.

    python examples/region_qa_video.py                                  # bundled demo model, synthetic clip (needs av)
    python examples/region_qa_video.py --model PATH_OR_REPO             # a converted or trained checkpoint
    python examples/region_qa_video.py --video clip.mp4 --box 40,30,200,180 --fps 1 --max-frames 16

Video files are decoded with PyAV (`pip install "pixelrefer-hf[video]"`) at `--fps` frames per second, at most
`--max-frames` frames spread over the whole video; regions refer to the indices of the decoded frames.
"""

import argparse
import os
import tempfile

import numpy as np
from transformers import pipeline

from pixelrefer_hf.media_io import read_video

# The synthetic clip: 8 one-second frames (the demo model was trained on 8-frame clips at 1 fps) of a red square
# moving 6 pixels per frame to the right.
CLIP_FRAMES, CLIP_STEP = 8, 6


def write_clip(path: str, num_frames: int = CLIP_FRAMES, fps: int = 1) -> None:
    """An 8-second clip of a red square moving from left to right over a grey background."""
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 192, 128, "yuv420p"
        for index in range(num_frames):
            frame = np.full((128, 192, 3), 190, dtype=np.uint8)
            left = 10 + CLIP_STEP * index
            frame[40:80, left : left + 40] = (220, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build_pipeline(model: str | None):
    if model:
        return pipeline("region-qa", model=model, trust_remote_code=True)
    from pixelrefer_hf.demo import demo_checkpoint

    print("No --model given: using the bundled demo model, a toy that only knows synthetic coloured shapes.\n")
    return pipeline("region-qa", model=demo_checkpoint("pixelrefer"), trust_remote_code=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or hub repo; default: the bundled demo model")
    parser.add_argument("--video", help="a video file; default: a synthetic clip")
    parser.add_argument("--box", default="10,40,50,80", help="x0,y0,x1,y1 of the object on the first decoded frame")
    parser.add_argument("--last-box", help="x0,y0,x1,y1 of the object on the last decoded frame (optional)")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--max-frames", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    pipe = build_pipeline(args.model)
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    with tempfile.TemporaryDirectory() as folder:
        path = args.video
        if path is None:
            path = os.path.join(folder, "clip.mp4")
            write_clip(path)
        box = [float(v) for v in args.box.split(",")]

        # 1. The pipeline decodes the file itself; the region is given on frame 0.
        result = pipe(
            video=path,
            regions=[{0: box}],
            question="What is <region>?",
            fps=args.fps,
            max_frames=args.max_frames,
            **options,
        )
        print("from the file:", result)

        # 2. Decode once, then ask several questions. For the motion the object is given on several frames (one
        #    group of object tokens per annotated frame, each with its time): on every frame for the synthetic clip,
        #    whose motion is known, as the demo model was trained; on the first and last frame with --last-box.
        video = read_video(path, fps=args.fps, max_frames=args.max_frames)
        print(f"decoded {len(video.frames)} frames at {[round(t, 2) for t in video.timestamps]} s")
        last = len(video.frames) - 1
        if args.last_box:
            track = {0: box, last: [float(v) for v in args.last_box.split(",")]}
        elif args.video is None:
            shift_per_second = CLIP_STEP
            track = {
                t: [box[0] + shift_per_second * seconds, box[1], box[2] + shift_per_second * seconds, box[3]]
                for t, seconds in enumerate(video.timestamps)
            }
        else:
            track = {0: box}
        common = {"video": video.frames, "video_timestamps": video.timestamps}
        items = [
            {**common, "regions": [{0: box}], "question": "What color is <region>?"},
            {**common, "regions": [track], "question": "Which way does <region> move?"},
        ]
        for item, answer in zip(items, pipe(items, batch_size=2, **options), strict=True):
            print(f"{item['question']!r} -> {answer}")


if __name__ == "__main__":
    main()
