"""A multi-task model made of plain user ``nn.Module``s (the equivalence tests' fixture).

Three components: ``vision`` (patch features -> pooled embedding), ``text`` (tokens -> pooled
embedding) and ``fusion`` (a small causal LM that reads the image embedding as a prefix), and
three tasks over them: ``match`` (a CLIP-style contrastive loss with a learnable temperature:
batch-coupled), ``classify`` (cross entropy on the image embedding, row-wise) and ``caption``
(next-token cross entropy of the fusion LM, row-wise, weight 0.5).  The data are generated per
item from its index.  ``workload(frozen=True)`` freezes the vision tower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spindle.declare.modules import ModuleStack
from spindle.declare.workload import Loss, Stage, Task, Workload

HIDDEN, EMBED, VOCAB, PATCHES, PATCH_DIM, TOKENS, CLASSES = 16, 8, 32, 6, 8, 5, 4


class Block(nn.Module):
    """Pre-norm self-attention and MLP, batch-first [B, T, H] (row-wise in the batch)."""

    def __init__(self, hidden: int, causal: bool = False) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                 nn.Linear(2 * hidden, hidden))
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        mask = None
        if self.causal:
            t = x.shape[1]
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Pool(nn.Module):
    """Mean over tokens, then a projection: [B, T, H] -> [B, E]."""

    def __init__(self, hidden: int, out: int) -> None:
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(hidden), nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x).mean(dim=1))


class Prefix(nn.Module):
    """The fusion LM's input: the image embedding as one prefix token, then the text tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.image = nn.Linear(EMBED, HIDDEN)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.image(image).unsqueeze(1), self.embed(tokens)], dim=1)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.out = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class Contrastive(nn.Module):
    """Symmetric InfoNCE with a learnable temperature (needs every row of the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        a = F.normalize(outputs["image"], dim=-1)
        b = F.normalize(outputs["text"], dim=-1)
        logits = self.scale.exp() * a @ b.T
        target = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(EMBED, CLASSES)

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        return F.cross_entropy(self.out(outputs["image"]), batch["label"])


def caption_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    """Next-token cross entropy: position p (the prefix, then tokens) predicts token p."""
    logits = outputs["lm"][:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch["tokens"].reshape(-1))


class Items(torch.utils.data.Dataset):
    """Item i: generated from i alone (patches, tokens, label)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + i)
        label = torch.randint(0, CLASSES, (), generator=g)
        return {
            "image": torch.randn(PATCHES, PATCH_DIM, generator=g) + label.float(),
            "tokens": (torch.randint(0, VOCAB // CLASSES, (TOKENS,), generator=g)
                       + label * (VOCAB // CLASSES)),
            "label": label,
        }


def workload(frozen: bool = False) -> Workload:
    components = {
        "vision": ModuleStack(pre=lambda: nn.Linear(PATCH_DIM, HIDDEN), layers=2,
                              layer=lambda i: Block(HIDDEN), post=lambda: Pool(HIDDEN, EMBED),
                              frozen=frozen),
        "text": ModuleStack(pre=lambda: nn.Embedding(VOCAB, HIDDEN), layers=3,
                            layer=lambda i: Block(HIDDEN), post=lambda: Pool(HIDDEN, EMBED)),
        "fusion": ModuleStack(pre=Prefix, layer=[Block(HIDDEN, causal=True) for _ in range(2)],
                              post=Head),
    }
    tasks = (
        Task(name="match", batch_size=4, dataset=Items(10), shuffle=True,
             stages=(Stage(name="image", component="vision", fields=("image",)),
                     Stage(name="text", component="text", fields=("tokens",))),
             loss=Loss(type="custom", inputs=("image", "text"), fn=Contrastive(),
                       coupled=True)),
        Task(name="classify", batch_size=6, dataset=Items(15),
             stages=(Stage(name="image", component="vision", fields=("image",)),),
             loss=Loss(type="custom", inputs=("image",), fields=("label",), fn=Classifier())),
        Task(name="caption", batch_size=6, dataset=Items(9), weight=0.5,
             stages=(Stage(name="image", component="vision", fields=("image",)),
                     Stage(name="lm", component="fusion", fields=("tokens",), inputs=("image",))),
             loss=Loss(type="custom", inputs=("lm",), fields=("tokens",), fn=caption_loss)),
    )
    name = "plain-modules-frozen" if frozen else "plain-modules"
    return Workload(name=name, components=components, tasks=tasks)
