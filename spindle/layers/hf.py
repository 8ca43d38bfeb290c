"""Hugging Face transformers as components: a model's own embeddings as the ``pre`` module, its
layers as the stack, its final norm / pooler / projection / LM head as ``post``.

Each function returns a :class:`~spindle.declare.modules.ModuleStack` (the generic protocol of
user stacks, nothing more), from an HF config object or a local checkpoint directory
(``config.json`` and ``model.safetensors`` or a sharded ``model.safetensors.index.json``;
never a download):

* :func:`clip_vision`: a CLIP ViT (``CLIPVisionModelWithProjection``): pixel values
  ``[B, C, H, W]`` -> the projected CLS embedding ``[B, projection_dim]``;
* :func:`bert_encoder`: BERT (``BertModel``): token ids ``[B, T]`` -> the pooled CLS state
  ``[B, hidden]`` (or the hidden states ``[B, T, hidden]`` with ``pooled=False``);
* :func:`causal_lm`: a decoder-only LLM, Qwen2 or Llama (``*ForCausalLM``): token ids
  ``[B, T]``, optionally after the outputs of earlier stages as a prefix (each ``[B, hidden]``
  or ``[B, P, hidden]``) -> logits ``[B, P + T, vocab]``.

Layers are built one by one (``layer(i)`` makes layer i alone), so a rank builds, and loads
from a checkpoint, only the layers it runs.  Attention runs through SDPA without a mask: causal
in the LLM, full in the encoders (no padding masks; see the README's contract).  Randomly
initialised modules follow HF's rule (normal(0, initializer_range) weights, zero biases, unit
norms); a checkpoint's tensors replace them.  Tied input/output embeddings become two
parameters (both loaded from the same tensor), so training unties them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spindle.declare.modules import ModuleStack
from spindle.layers.provider import LayerError

Source = Any  # an HF PretrainedConfig, or a checkpoint directory (str or Path)


# --- the three families --------------------------------------------------------------------------


def clip_vision(source: Source, frozen: bool = False) -> ModuleStack:
    """A CLIP vision tower (module docstring)."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip import modeling_clip as m

    config, ckpt = _config(source, CLIPVisionConfig, "vision_config")
    prefixes = ("vision_model.", "")  # CLIPVisionModelWithProjection, CLIPVisionModel

    def pre() -> nn.Module:
        return _loaded(_Sequence(m.CLIPVisionEmbeddings(config),
                                 nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)),
                       config, ckpt, {"0.": ["embeddings."], "1.": ["pre_layrnorm."]}, prefixes)

    def layer(i: int) -> nn.Module:
        return _loaded(_Encoder(m.CLIPEncoderLayer(config)), config, ckpt,
                       {"layer.": [f"encoder.layers.{i}."]}, prefixes)

    def post() -> nn.Module:
        head = _ClipHead(nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
                         nn.Linear(config.hidden_size, config.projection_dim, bias=False))
        return _loaded(head, config, ckpt, {"norm.": ["post_layernorm."],
                                            "proj.": ["visual_projection."]}, prefixes + ("",))

    return ModuleStack(pre=pre, layers=config.num_hidden_layers, layer=layer, post=post,
                       frozen=frozen)


def bert_encoder(source: Source, pooled: bool = True, frozen: bool = False) -> ModuleStack:
    """A BERT text encoder (module docstring)."""
    from transformers import BertConfig
    from transformers.models.bert import modeling_bert as m

    config, ckpt = _config(source, BertConfig, None)
    prefixes = ("", "bert.")  # BertModel, Bert*For*

    def pre() -> nn.Module:
        return _loaded(_Sequence(m.BertEmbeddings(config)), config, ckpt,
                       {"0.": ["embeddings."]}, prefixes)

    def layer(i: int) -> nn.Module:
        return _loaded(_Encoder(m.BertLayer(config, layer_idx=i)), config, ckpt,
                       {"layer.": [f"encoder.layer.{i}."]}, prefixes)

    def post() -> nn.Module:
        return _loaded(_Sequence(m.BertPooler(config)), config, ckpt, {"0.": ["pooler."]},
                       prefixes)

    return ModuleStack(pre=pre, layers=config.num_hidden_layers, layer=layer,
                       post=post if pooled else None, frozen=frozen)


def causal_lm(source: Source, frozen: bool = False) -> ModuleStack:
    """A decoder-only LLM, Qwen2 or Llama (module docstring)."""
    config, ckpt = _config(source, None, "text_config")
    family = _llm_family(config)
    prefixes = ("model.", "")

    def pre() -> nn.Module:
        embed = nn.Embedding(config.vocab_size, config.hidden_size)
        return _loaded(_Prefix(embed), config, ckpt, {"embed.": ["embed_tokens."]}, prefixes)

    def layer(i: int) -> nn.Module:
        body = _Decoder(family["layer"](config, layer_idx=i), family["rotary"](config=config))
        return _loaded(body, config, ckpt, {"layer.": [f"layers.{i}."]}, prefixes)

    def post() -> nn.Module:
        head = _LMHead(family["norm"](config.hidden_size, eps=config.rms_norm_eps),
                       nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        return _loaded(head, config, ckpt, {"norm.": ["norm."], "out.": ["lm_head.",
                                                                        "embed_tokens."]},
                       prefixes + ("",))

    return ModuleStack(pre=pre, layers=config.num_hidden_layers, layer=layer, post=post,
                       frozen=frozen)


# --- the wrappers: one tensor in, one tensor out ------------------------------------------------


class _Sequence(nn.Sequential):
    """Modules applied in turn (HF embeddings take the raw input as their first argument)."""


class _Encoder(nn.Module):
    """An HF encoder layer on hidden states, without an attention mask."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _first(self.layer(x, None))


class _Decoder(nn.Module):
    """An HF decoder layer on hidden states: rotary position embeddings of positions 0..T-1,
    causal attention (SDPA with no mask)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module) -> None:
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        cos, sin = self.rotary(x, positions)
        return _first(self.layer(x, attention_mask=None, position_ids=positions,
                                 position_embeddings=(cos, sin)))


class _Prefix(nn.Module):
    """Token embeddings after the outputs of earlier stages (each [B, H] or [B, P, H])."""

    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, tokens: torch.Tensor, *prefix: torch.Tensor) -> torch.Tensor:
        parts = [p.unsqueeze(1) if p.dim() == 2 else p for p in prefix]
        return torch.cat([*parts, self.embed(tokens)], dim=1)


class _ClipHead(nn.Module):
    """CLIP's pooling: the CLS state, normalised, projected."""

    def __init__(self, norm: nn.Module, proj: nn.Module) -> None:
        super().__init__()
        self.norm, self.proj = norm, proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x[:, 0]))


class _LMHead(nn.Module):
    def __init__(self, norm: nn.Module, out: nn.Module) -> None:
        super().__init__()
        self.norm, self.out = norm, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# --- configs, initialisation and checkpoints ----------------------------------------------------


def _llm_family(config: Any) -> dict[str, Callable[..., nn.Module]]:
    kind = getattr(config, "model_type", "")
    if kind == "qwen2":
        from transformers.models.qwen2 import modeling_qwen2 as q

        return {"layer": q.Qwen2DecoderLayer, "rotary": q.Qwen2RotaryEmbedding,
                "norm": q.Qwen2RMSNorm}
    if kind == "llama":
        from transformers.models.llama import modeling_llama as ll

        return {"layer": ll.LlamaDecoderLayer, "rotary": ll.LlamaRotaryEmbedding,
                "norm": ll.LlamaRMSNorm}
    raise LayerError(f"causal_lm: model type '{kind}' is not supported (qwen2, llama); wrap"
                     " its layers in a ModuleStack (README: Bring your own model)")


def _config(source: Source, cls: Any, sub: str | None) -> tuple[Any, Path | None]:
    """(config with SDPA attention, checkpoint directory or None)."""
    ckpt: Path | None = None
    if isinstance(source, (str, Path)):
        ckpt = Path(source)
        if not (ckpt / "config.json").is_file():
            raise LayerError(f"{ckpt}: not a checkpoint directory (no config.json)")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(ckpt), local_files_only=True)
        except Exception as err:  # transformers' own message, in one line
            raise LayerError(f"{ckpt}/config.json: {' '.join(str(err).split())}") from None
        if not _weight_files(ckpt):
            raise LayerError(f"{ckpt}: no model.safetensors (or index) to load")
    else:
        config = source
    if sub is not None and hasattr(config, sub) and getattr(config, sub) is not None:
        config = getattr(config, sub)  # a CLIPConfig's vision part, a VLM's text part
    if cls is not None and not isinstance(config, cls):
        raise LayerError(f"expected a {cls.__name__}, got {type(config).__name__}")
    config._attn_implementation = "sdpa"
    return config, ckpt


def _loaded(module: nn.Module, config: Any, ckpt: Path | None,
            names: dict[str, Sequence[str]], prefixes: Sequence[str]) -> nn.Module:
    """``module`` initialised (HF's rule), then, with a checkpoint and not on the meta device,
    each of its tensors read from the checkpoint: ``names`` maps a prefix of the module's names
    to the candidate prefixes in the HF model, each tried after each of ``prefixes``."""
    if torch.empty(0).device.type == "meta":
        return module
    _init(module, float(getattr(config, "initializer_range", 0.02)))
    if ckpt is None:
        return module
    files = _weight_files(ckpt)
    state = module.state_dict()
    wanted: dict[str, str] = {}
    available = _keys(files)
    for name in state:
        ours = next((p for p in names if name.startswith(p)), None)
        if ours is None:
            continue
        rest = name[len(ours):]
        candidates = [f"{pre}{theirs}{rest}" for theirs in names[ours] for pre in prefixes]
        found = next((c for c in candidates if c in available), None)
        if found is None:
            if rest.endswith(("inv_freq", "position_ids", "token_type_ids")):
                continue  # buffers HF does not save
            raise LayerError(f"{ckpt}: no tensor '{candidates[0]}' for '{name}'")
        wanted[name] = found
    from safetensors import safe_open

    loaded: dict[str, torch.Tensor] = {}
    for path in sorted({available[k] for k in wanted.values()}):
        with safe_open(str(path), framework="pt") as f:  # reads only the tensors asked for
            for ours, theirs in wanted.items():
                if available[theirs] == path:
                    loaded[ours] = f.get_tensor(theirs)
    for name, tensor in loaded.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise LayerError(f"{ckpt}: '{wanted[name]}' has shape {list(tensor.shape)}, the"
                             f" module wants {list(state[name].shape)}")
    module.load_state_dict(loaded, strict=False)
    return module


def _init(module: nn.Module, std: float) -> None:
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.Conv2d, nn.Embedding)):
                sub.weight.normal_(0.0, std)
                bias = getattr(sub, "bias", None)
                if bias is not None:
                    bias.zero_()
            elif hasattr(sub, "weight") and isinstance(sub.weight, nn.Parameter) and \
                    sub.weight.dim() == 1 and "norm" in type(sub).__name__.lower():
                sub.weight.fill_(1.0)
                norm_bias = getattr(sub, "bias", None)
                if isinstance(norm_bias, nn.Parameter):
                    norm_bias.zero_()
        for name, p in module.named_parameters():
            if name.endswith("class_embedding"):  # CLIP's CLS token
                p.normal_(0.0, std)


def _weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        shards = json.loads(index.read_text()).get("weight_map", {}).values()
        return sorted({ckpt / s for s in shards})
    single = ckpt / "model.safetensors"
    return [single] if single.is_file() else []


def _keys(files: Sequence[Path]) -> dict[str, Path]:
    """Tensor name -> the file holding it (the headers only are read)."""
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                out[key] = path
    return out
