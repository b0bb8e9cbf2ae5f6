"""Load test of `pixelrefer serve` (Ray Serve, dynamic batching) against the plain pipeline in one process.

    python benchmarks/bench_serve.py                     # demo checkpoint, 1 / 8 / 32 concurrent clients
    python benchmarks/bench_serve.py --requests 64 --levels 1,8,32

Rows: the region-qa pipeline in this process, one request at a time behind a lock (what a naive single-process server
does; no HTTP); Serve with 1 replica (given every CPU of the local cluster) and with 2 replicas (half each), over HTTP
on 127.0.0.1. Every client thread sends its share of `--requests` requests back to back, each a question about one of
the example image's shapes; the table gives requests/s over the whole level and the p50 / p99 latency of single
requests. Every answer is checked against the pipeline's. A local Ray cluster with `--cpus` CPUs is started and
stopped here; nothing is downloaded.
"""

import argparse
import base64
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench_utils import add_run_arguments, markdown_table, parse_run_arguments, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "examples" / "assets" / "shapes.png"
BOXES = [[40, 40, 90, 90], [30, 120, 90, 180], [140, 30, 184, 74], [100, 170, 136, 206], [150, 150, 160, 160]]
QUESTIONS = ["What is <region>?", "What color is <region>?", "What shape is <region>?"]
CASES = [(box, question) for box in BOXES for question in QUESTIONS]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def load(send, clients: int, requests: int) -> dict:
    """`requests` calls of `send(case_index) -> answer` from `clients` threads; throughput and latencies."""
    latencies: list[float] = []
    answers: dict[int, str] = {}
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(thread: int) -> None:
        start.wait()
        for index in range(thread, requests, clients):
            began = time.perf_counter()
            answer = send(index % len(CASES))
            elapsed = time.perf_counter() - began
            with lock:
                latencies.append(elapsed)
                answers[index] = answer

    threads = [threading.Thread(target=client, args=(t,)) for t in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    return {
        "clients": clients,
        "requests": requests,
        "seconds": wall,
        "requests_per_s": requests / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 99),
        "answers": answers,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="what `pixelrefer serve --model` takes (default demo)")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (default 64)")
    parser.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated (default 1,8,32)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-timeout", type=float, default=0.01)
    parser.add_argument("--smoke", action="store_true", help="2 and 1 clients, 4 requests, 1 replica only")
    add_run_arguments(parser)
    args = parse_run_arguments(parser, argv)
    levels = [2, 1] if args.smoke else [int(level) for level in args.levels.split(",")]
    requests_per_level = 4 if args.smoke else args.requests
    replica_counts = [1] if args.smoke else [1, 2]

    import ray
    import requests
    import torch
    from ray import serve

    from pixelrefer_hf.cli import load_region_qa_pipeline
    from pixelrefer_hf.serving import API_PATH, build_app

    image_bytes = SHAPES.read_bytes()
    encoded = base64.b64encode(image_bytes).decode()
    # The one-process baseline uses every CPU the Serve rows get.
    torch.set_num_threads(args.cpus)
    pipe = load_region_qa_pipeline(args.model)
    expected = [pipe(image=str(SHAPES), regions=[box], question=question)["answer"] for box, question in CASES]
    pipe_lock = threading.Lock()

    def send_in_process(case: int) -> str:
        box, question = CASES[case]
        with pipe_lock:
            return pipe(image=str(SHAPES), regions=[box], question=question)["answer"]

    rows = []
    results: list[dict] = []

    def record(name: str, send) -> None:
        send(0)  # warm-up
        for clients in levels:
            level = load(send, clients, requests_per_level)
            wrong = sum(answer != expected[index % len(CASES)] for index, answer in level.pop("answers").items())
            if wrong:
                raise SystemExit(f"{name}, {clients} clients: {wrong} answers differ from the pipeline's")
            results.append({"setup": name, **level})
            rows.append(
                [name, clients, f"{level['requests_per_s']:.1f}", f"{level['p50_ms']:.0f}", f"{level['p99_ms']:.0f}"]
            )
            print(rows[-1], file=sys.stderr, flush=True)

    record("pipeline, one process (no HTTP)", send_in_process)

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        for replicas in replica_counts:
            port = 18000 + replicas
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            application = build_app(
                args.model,
                replicas=replicas,
                max_batch_size=args.max_batch_size,
                batch_wait_timeout=args.batch_wait_timeout,
                num_cpus=args.cpus / replicas,
            )
            serve.run(application, name="bench", route_prefix="/")
            url = f"http://127.0.0.1:{port}{API_PATH}"
            session = threading.local()

            def send_http(case: int, url: str = url, session: threading.local = session) -> str:
                if not hasattr(session, "client"):
                    session.client = requests.Session()
                box, question = CASES[case]
                payload = {"image": encoded, "regions": [box], "question": question}
                response = session.client.post(url, json=payload, timeout=600)
                response.raise_for_status()
                return response.json()["answer"]

            record(f"Serve, {replicas} replica{'s' if replicas > 1 else ''}", send_http)
            serve.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()

    table = markdown_table(["setup", "concurrent clients", "requests/s", "p50 latency (ms)", "p99 latency (ms)"], rows)
    payload = {
        "model": args.model,
        "requests_per_level": requests_per_level,
        "cpus": args.cpus,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout": args.batch_wait_timeout,
        "results": results,
    }
    write_results("serve", payload, table, args.output_dir)
    return payload


if __name__ == "__main__":
    main()
