"""A frozen vision tower with a trained LLM, at real sizes, planned from HF modules.

The most common multimodal set-up: a CLIP ViT-L/14 (336 px) kept frozen, a Qwen2-7B LLM
trained on captioning (the image embedding as a prefix) and on text alone, and a BERT-base text
encoder trained against the frozen tower (retrieval).  Every module is an HF class built on
the meta device; its FLOPs are counted with torch.utils.flop_counter, nothing is measured or
downloaded.  Prints Spindle's simulated iteration against each baseline, frozen and trained,
on the A800 model.

    .venv/bin/python benchmarks/frozen_vision.py [--devices 16 32]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, CLIPVisionConfig, Qwen2Config

from spindle.declare.workload import Loss, Stage, Task, Workload
from spindle.layers.hf import bert_encoder, causal_lm, clip_vision
from spindle.planner.pipeline import BASELINES, evaluate, make_context

TOKENS, PIXELS = 256, 336
VIT_L = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, image_size=PIXELS, patch_size=14,
                         projection_dim=3584)  # projected straight to the LLM's width
QWEN2_7B = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=4096, tie_word_embeddings=False)
BERT_BASE = BertConfig(max_position_embeddings=TOKENS)


class Shapes(torch.utils.data.Dataset):
    """One item of the right shapes (only the probe reads it: nothing is trained here)."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": torch.zeros(3, PIXELS, PIXELS),
                "tokens": torch.zeros(TOKENS, dtype=torch.long)}


def lm_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = outputs["lm"][:, -TOKENS:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["tokens"].reshape(-1))


class Contrastive(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(768, 3584)

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        a = F.normalize(outputs["image"], dim=-1)
        b = F.normalize(self.proj(outputs["text"]), dim=-1)
        return F.cross_entropy(a @ b.T, torch.arange(a.shape[0], device=a.device))


def workload(frozen: bool) -> Workload:
    image = Stage(name="image", component="vision", fields=("image",))
    return Workload(
        name=f"vit-l-qwen2-7b-{'frozen' if frozen else 'trained'}",
        components={"vision": clip_vision(VIT_L, frozen=frozen), "llm": causal_lm(QWEN2_7B),
                     "text": bert_encoder(BERT_BASE)},
        tasks=(
            Task(name="caption", batch_size=64, dataset=Shapes(),
                 stages=(image, Stage(name="lm", component="llm", fields=("tokens",),
                                      inputs=("image",))),
                 loss=Loss(type="custom", inputs=("lm",), fields=("tokens",), fn=lm_loss)),
            Task(name="text", batch_size=64, dataset=Shapes(),
                 stages=(Stage(name="lm", component="llm", fields=("tokens",)),),
                 loss=Loss(type="custom", inputs=("lm",), fields=("tokens",), fn=lm_loss)),
            Task(name="retrieval", batch_size=128, dataset=Shapes(),
                 stages=(image, Stage(name="text", component="text", fields=("tokens",))),
                 loss=Loss(type="custom", inputs=("image", "text"), fn=Contrastive(),
                           coupled=True)),
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[16, 32])
    args = parser.parse_args()
    print("| vision | devices | spindle ms | " + " | ".join(f"{b} ms" for b in BASELINES)
          + " | x sequential | x best baseline | planning s |")
    print("|---" * (6 + len(BASELINES)) + "|")
    for frozen in (True, False):
        w = workload(frozen)
        for n in args.devices:
            t0 = time.perf_counter()
            ctx = make_context(w, n, 8, "a800", check_memory=False)
            spindle = evaluate(ctx, "spindle").simulation.makespan_s
            base = {b: evaluate(ctx, b).simulation.makespan_s for b in BASELINES}
            elapsed = time.perf_counter() - t0
            cells = " | ".join(f"{1e3 * base[b]:.0f}" for b in BASELINES)
            print(f"| {'frozen' if frozen else 'trained'} | {n} | {1e3 * spindle:.0f} | {cells}"
                  f" | {base['sequential'] / spindle:.2f} | {min(base.values()) / spindle:.2f}"
                  f" | {elapsed:.1f} |")


if __name__ == "__main__":
    main()
