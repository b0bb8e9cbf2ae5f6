"""Stream an answer token by token with `pipeline("region-qa")` and transformers' `TextIteratorStreamer`.

    python examples/region_qa_streaming.py                              # bundled demo model (synthetic shapes)
    python examples/region_qa_streaming.py --model PATH_OR_REPO         # a converted or trained checkpoint

`generate` runs in a background thread and pushes text into the streamer; the main thread prints it as it comes.
Streaming works with one item per call (a streamer follows one sequence).
"""

import argparse
from threading import Thread

import numpy as np
from transformers import TextIteratorStreamer, pipeline


def build_pipeline(model: str | None):
    if model:
        return pipeline("region-qa", model=model, trust_remote_code=True)
    from pixelrefer_hf.demo import demo_checkpoint

    print("No --model given: using the bundled demo model, a toy that only knows synthetic coloured shapes.\n")
    return pipeline("region-qa", model=demo_checkpoint("pixelrefer"), trust_remote_code=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or hub repo; default: the bundled demo model")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    pipe = build_pipeline(args.model)
    image = np.full((160, 200, 3), 200, dtype=np.uint8)
    image[40:100, 50:120] = (30, 160, 30)
    # skip_prompt: only the answer is streamed, not the chat-template prompt.
    streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    request = {"image": image, "regions": [[50, 40, 120, 100]], "question": "What is <region>?"}
    worker = Thread(target=pipe, args=(request,), kwargs={"streamer": streamer, "max_new_tokens": args.max_new_tokens})
    worker.start()
    print("What is <region>? -> ", end="", flush=True)
    for text in streamer:
        print(text, end="", flush=True)
    worker.join()
    print()


if __name__ == "__main__":
    main()
