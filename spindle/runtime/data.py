"""Synthetic, learnable training data, deterministic from (seed, task, stage, step).

Every sample of a task's batch at a step has a hidden *class* in [0, NUM_CLASSES), drawn from
(seed, task, step), so all stages of one sample agree on it.  Each component renders a class as
a fixed prototype (from (seed, component, tokens)): a token sequence for a ``tokens`` adapter, a
[tokens, dim] feature map for a ``features`` adapter.  A stage's raw input is its component's
prototype of each sample's class with per-sample noise (token substitutions / Gaussian noise)
drawn from (seed, task, stage, step).  So paired modalities carry the same information (the
contrastive loss can fall) and token sequences are predictable (the LM loss can fall), while no
two steps see the same batch.
"""

from __future__ import annotations

import torch

from spindle.declare.workload import Workload
from spindle.layers.provider import LayerError, keyed_generator

NUM_CLASSES = 16
TOKEN_NOISE = 0.1  # probability that a token is replaced by a random one
FEATURE_NOISE = 0.5  # std of the Gaussian noise added to a feature prototype


def sample_classes(workload: Workload, task: str, step: int, seed: int) -> torch.Tensor:
    """The hidden class of every sample of ``task``'s batch at ``step``: LongTensor [B]."""
    batch = workload.task(task).batch_size
    g = keyed_generator(seed, "classes", task, step)
    return torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def token_range(workload: Workload, component: str) -> int:
    """Tokens are drawn in [0, token_range): inside both the embedding and the LM head."""
    comp = workload.components[component]
    if comp.input is None or comp.input.vocab is None:
        raise LayerError(f"component '{component}' has no 'tokens' input adapter")
    return min(comp.input.vocab, comp.vocab) if comp.vocab is not None else comp.input.vocab


def make_raw(
    workload: Workload, task: str, stage: str, step: int, seed: int
) -> torch.Tensor | None:
    """The FULL batch of raw input of ``stage`` of ``task`` at ``step`` (CPU), or ``None`` if
    the stage reads no raw tokens: LongTensor [B, tokens] in [0, vocab) for a ``tokens``
    adapter, float32 [B, tokens, dim] for a ``features`` adapter."""
    st = next((s for s in workload.task(task).stages if s.name == stage), None)
    if st is None:
        raise LayerError(f"task '{task}' has no stage '{stage}'")
    if st.tokens == 0:
        return None
    comp = workload.components[st.component]
    if comp.input is None:  # the workload validator already refuses this
        raise LayerError(f"{task}/{stage}: tokens {st.tokens} but no input adapter")
    classes = sample_classes(workload, task, step, seed)
    batch = classes.shape[0]
    proto_gen = keyed_generator(seed, "prototype", st.component, st.tokens)
    noise_gen = keyed_generator(seed, "raw", task, stage, step)
    if comp.input.type == "tokens":
        vocab = token_range(workload, st.component)
        proto = torch.randint(0, vocab, (NUM_CLASSES, st.tokens), generator=proto_gen)
        tokens = proto[classes]
        replace = torch.rand(batch, st.tokens, generator=noise_gen) < TOKEN_NOISE
        random_tokens = torch.randint(0, vocab, (batch, st.tokens), generator=noise_gen)
        return torch.where(replace, random_tokens, tokens)
    dim = int(comp.input.dim or 0)
    proto = torch.randn(NUM_CLASSES, st.tokens, dim, generator=proto_gen)
    noise = torch.randn(batch, st.tokens, dim, generator=noise_gen)
    return proto[classes] + FEATURE_NOISE * noise
