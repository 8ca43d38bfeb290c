"""A multi-task multi-modal model made of Hugging Face modules, trained with Spindle.

Three components from three HF families (tiny random configs, so it runs on a laptop):

* ``vision``: a CLIP ViT (``spindle.layers.hf.clip_vision``): images -> a 32-d embedding;
* ``text``: a BERT encoder (``bert_encoder``) plus a projection to the same 32 dims;
* ``llm``: a Qwen2 decoder (``causal_lm``) that reads the image embedding as a prefix token.

and three tasks over them, each with its own dataset and loss:

* ``retrieval``: CLIP-style contrastive loss between images and captions (batch-coupled: it
  needs every row of the batch, so Spindle runs it on one device);
* ``captioning``: the LLM predicts the caption's tokens after the image (row-wise);
* ``classify``: a linear probe on the image embedding (row-wise, weight 0.5).

Run it (2 CPU processes, under a minute):

    spindle plan examples/hf_multitask.py --devices 2 --hardware cpu
    spindle train examples/hf_multitask.py --nproc 2 --steps 20 --save out/

Set ``FROZEN_VISION = True`` to train the text encoder and the LLM on a frozen vision tower (the
usual multimodal set-up): it then costs its forward only.  For a pretrained model, pass a local
checkpoint directory instead of a config (``clip_vision("path/to/clip")``); each rank reads only
the layers it runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, CLIPVisionConfig, Qwen2Config

from spindle.declare.modules import ModuleStack
from spindle.declare.workload import Loss, Stage, Task, Workload
from spindle.layers.hf import bert_encoder, causal_lm, clip_vision

FROZEN_VISION = False
EMBED, VOCAB, TOKENS, CLASSES, IMAGE = 32, 96, 8, 4, 16

VISION = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=2, image_size=IMAGE, patch_size=8,
                          projection_dim=EMBED)
TEXT = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=TOKENS,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LLM = Qwen2Config(vocab_size=VOCAB, hidden_size=EMBED, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=TOKENS + 1, tie_word_embeddings=False)


class Captions(torch.utils.data.Dataset):
    """Item i, generated from i alone: an image whose pattern and a caption whose words both
    depend on a class label."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        label = torch.randint(0, CLASSES, (), generator=g)
        image = torch.randn(3, IMAGE, IMAGE, generator=g) * 0.5
        image[label % 3] += 1.0
        words = VOCAB // CLASSES
        tokens = torch.randint(0, words, (TOKENS,), generator=g) + label * words
        return {"image": image, "tokens": tokens, "label": label}


class Contrastive(nn.Module):
    """Symmetric InfoNCE with a learnable temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        a = F.normalize(outputs["image"], dim=-1)
        b = F.normalize(outputs["caption"], dim=-1)
        logits = self.scale.exp() * a @ b.T
        target = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(EMBED, CLASSES)

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        return F.cross_entropy(self.out(outputs["image"]), batch["label"])


def caption_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    """Position p (the image prefix, then the tokens) predicts token p."""
    logits = outputs["lm"][:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch["tokens"].reshape(-1))


def text_tower() -> ModuleStack:
    """BERT's pooled state projected to the shared embedding: the generic protocol lets a
    component add its own modules around an HF family's (here a post module of its own)."""
    bert = bert_encoder(TEXT)

    def post() -> nn.Module:
        return nn.Sequential(bert.build_part("post"), nn.Linear(TEXT.hidden_size, EMBED))

    return ModuleStack(pre=bert.pre, layers=bert.layers, layer=bert.layer, post=post)


def workload() -> Workload:
    image = Stage(name="image", component="vision", fields=("image",))
    return Workload(
        name="hf-multitask",
        components={"vision": clip_vision(VISION, frozen=FROZEN_VISION), "text": text_tower(),
                    "llm": causal_lm(LLM)},
        tasks=(
            Task(name="retrieval", batch_size=8, dataset=Captions(64), shuffle=True,
                 stages=(image, Stage(name="caption", component="text", fields=("tokens",))),
                 loss=Loss(type="custom", inputs=("image", "caption"), fn=Contrastive(),
                           coupled=True)),
            Task(name="captioning", batch_size=8, dataset=Captions(48),
                 stages=(image, Stage(name="lm", component="llm", fields=("tokens",),
                                      inputs=("image",))),
                 loss=Loss(type="custom", inputs=("lm",), fields=("tokens",), fn=caption_loss)),
            Task(name="classify", batch_size=4, dataset=Captions(32), weight=0.5,
                 stages=(image,),
                 loss=Loss(type="custom", inputs=("image",), fields=("label",), fn=Probe())),
        ),
    )
