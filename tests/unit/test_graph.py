"""Graph contraction into MetaOps and MetaLevels (docs/method.md section 3)."""

from spindle.costs.graph import build_operator_graph, contract
from spindle.declare.workload import load_workload


def test_clip_metaops_are_stage_chains():
    w = load_workload("multitask-clip-4")
    g = contract(w)
    ops, edges = build_operator_graph(w, g.provider)
    assert sum(m.num_layers for m in g.metaops) == len(ops)
    by_name = {m.name: m for m in g.metaops}
    vt = by_name["vision-text/vision"]
    assert vt.num_layers == 32 and vt.batch == 256 and vt.cost.tokens == 257 and vt.level == 0
    loss = by_name["vision-text/loss"]
    assert loss.is_loss and loss.level == 1 and len(loss.deps) == 2
    # the text encoder on two tasks: two MetaOps sharing parameters
    texts = [m for m in g.metaops if m.component == "text"]
    assert len(texts) == 2 and all(m.cost.shared_by == 2 for m in texts)


def test_contraction_rule_breaks_on_shape_and_indegree():
    g = contract(load_workload("ofasys-4"))
    by = {m.name: m for m in g.metaops}
    enc = by["caption/encode"]
    assert enc.cost.tokens == 197 + 16 and enc.deps == (by["caption/vit"].id,)
    dec = by["caption/decode"]
    assert dec.cost.memory_tokens == 197 + 16 and dec.level == 2 and dec.num_layers == 12
    summ = by["summarize/encode"]
    assert summ.level == 0 and summ.deps == ()


def test_levels_never_depend_within_level():
    for name in ("multitask-clip-10", "ofasys-7", "qwen-val-3", "tiny-ofasys"):
        g = contract(load_workload(name))
        for m in g.metaops:
            for d in m.deps:
                assert g.metaops[d].level < m.level
            assert m.level == (1 + max(g.metaops[d].level for d in m.deps) if m.deps else 0)


def test_pooling_and_concatenation_shapes():
    g = contract(load_workload("qwen-val-3"))
    by = {m.name: m for m in g.metaops}
    assert by["vision-audio-language/lm"].cost.tokens == 256 + 750 + 128
    assert by["vision-language/vision"].cost.out_elements_per_sample == 256 * 1664
    # lm loss stage hands nothing on
    assert by["vision-language/lm"].cost.out_elements_per_sample == 0
