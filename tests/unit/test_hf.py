"""Hugging Face components: each family's stack computes what the HF model computes, from its
config or from a local checkpoint, and a layer built alone reads only its own tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from spindle.declare.modules import ModuleStack  # noqa: E402
from spindle.layers.hf import bert_encoder, causal_lm, clip_vision  # noqa: E402
from spindle.layers.provider import LayerError  # noqa: E402


def run(stack: ModuleStack, *inputs: torch.Tensor) -> torch.Tensor:
    x = stack.build_part("pre").double()(*inputs)
    for i in range(stack.layers):
        x = stack.build_layer(i).double()(x)
    return stack.build_part("post").double()(x) if stack.post is not None else x


def clip_case() -> tuple[object, object, tuple[torch.Tensor, ...], object]:
    cfg = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=16, patch_size=8,
                                        projection_dim=8)
    model = transformers.CLIPVisionModelWithProjection(cfg)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    return cfg, model, (x,), lambda m, a: m(pixel_values=a[0]).image_embeds


def bert_case() -> tuple[object, object, tuple[torch.Tensor, ...], object]:
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(cfg)
    x = torch.randint(0, 50, (3, 7))
    return cfg, model, (x,), lambda m, a: m(input_ids=a[0]).pooler_output


def lm_case(kind: str) -> tuple[object, object, tuple[torch.Tensor, ...], object]:
    common = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                  tie_word_embeddings=False)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    x = torch.randint(0, 50, (3, 7))
    return cfg, model, (x,), lambda m, a: m(input_ids=a[0]).logits


CASES = {"clip": (clip_case, clip_vision), "bert": (bert_case, bert_encoder),
         "qwen2": (lambda: lm_case("qwen2"), causal_lm),
         "llama": (lambda: lm_case("llama"), causal_lm)}


@pytest.mark.parametrize("family", sorted(CASES))
def test_a_checkpoint_stack_computes_what_the_hf_model_computes(tmp_path: Path,
                                                               family: str) -> None:
    make, build = CASES[family]
    torch.manual_seed(0)
    cfg, model, inputs, hf_out = make()
    model.save_pretrained(tmp_path)  # safetensors
    model = model.double().eval()
    cfg._attn_implementation = "sdpa"
    with torch.no_grad():
        want = hf_out(model, inputs)
        got = run(build(tmp_path), *inputs)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-10, rtol=1e-9), float((got - want).abs().max())
    random_init = run(build(cfg), *inputs)  # the same modules, HF's initialisation rule
    assert random_init.shape == want.shape and not torch.allclose(random_init, want)


def test_a_layer_built_alone_reads_only_its_own_tensors(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors

    cfg, model, _, _ = lm_case("qwen2")
    model.save_pretrained(tmp_path)
    read: list[str] = []
    real = safetensors.safe_open

    class Recording:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.f = real(*args, **kwargs)

        def __enter__(self) -> "Recording":
            self.f.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.__exit__(*exc)

        def keys(self) -> list[str]:
            return list(self.f.keys())

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    layer = causal_lm(tmp_path).build_layer(1)
    assert read and all(k.startswith("model.layers.1.") for k in read)
    want = model.model.layers[1].state_dict()
    for name, value in layer.layer.state_dict().items():
        assert torch.equal(value, want[name]), name


def test_bad_checkpoints_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match="not a checkpoint directory"):
        clip_vision(tmp_path)
    cfg, model, _, _ = bert_case()
    model.save_pretrained(tmp_path)
    with pytest.raises(LayerError, match="expected a CLIPVisionConfig, got BertConfig"):
        clip_vision(tmp_path)
    with pytest.raises(LayerError, match="model type 'bert' is not supported"):
        causal_lm(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LayerError, match="no model.safetensors"):
        bert_encoder(tmp_path)
