"""Limits of a workload description, so that every step of planning stays polynomial in its
size (each is far above any real model: Qwen-7B has 32 layers, hidden 4096, a 151,936-token
vocabulary)."""

MAX_LAYERS = 100_000
MAX_WIDTH = 1_000_000  # hidden, ffn, feature dim, output_dim, heads
MAX_VOCAB = 100_000_000
MAX_TOKENS = 100_000_000
MAX_BATCH = 1_000_000_000
MAX_OPERATORS = 1_000_000  # layers over every stage of every task
