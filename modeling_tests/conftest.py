"""Tests never touch the network: everything they load is built locally."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: the tiny models gain nothing from more, and tests that start subprocesses would otherwise
# oversubscribe the 2 CI cores (seen as 30x slowdowns).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(1)
