"""The contract every registered objective keeps, parametrized over the registry: a new
objective gets all of these tests without editing any list.

For every leaf of every registered objective (default settings, and the settings
variants each objective declares in `CONTRACT_VARIANTS` below when it has options
that change its layout):
- its examples use only the attention kinds and token types it declares;
- packed into rows, its examples come back out intact;
- through the model, it leaks nothing: changing a token that a query may not see
  leaves that query's hidden state bit-identical (and changing one it may see does not),
  under the dense mask and under the fused kernel's key ranges;
- where its declared kinds give key ranges, the ranges are the rule exactly; where they
  do not, a run asking for the fused kernel falls back to the dense path;
- a tiny model overfits one batch of it;
- generation works in every mode its layout offers.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import objectives
from objectives.example import TextChunk
from pretrain import generate as gen
from pretrain import heads
from pretrain.attention import attention_mask, choose_attention, has_key_ranges, key_ranges
from pretrain.loss import batch_loss
from pretrain.model import create_model, preset
from pretrain.packing import PACKED_FIELDS, pack
from reach import reach_through_layers

SIZE = 400
rng = np.random.default_rng(0)
VOCAB = objectives.Vocabulary.reserved(SIZE, sentinels=100, word_start=rng.random(SIZE) < 0.6)
SEQ_LEN = 96
# Options that change an objective's layout, so they get the contract too.
CONTRACT_VARIANTS = {"mlm": [{"nsp": True}, {"whole_word": True}], "unilm": [{"nsp": True}],
                     "mass": [{"decoder_sees_masked_source": True}]}


BUILT_WITH: dict[str, tuple[str, dict]] = {}  # leaf id -> (registered name, settings)


def leaves() -> list[tuple[str, objectives.Objective]]:
    out = []
    for name in objectives.registered_names():
        for settings in [{}, *CONTRACT_VARIANTS.get(name, [])]:
            suffix = "".join(f"[{k}={v}]" for k, v in settings.items())
            for leaf in objectives.build_mixture(name, VOCAB, {name: settings}).objectives:
                leaf.objective_id = 0
                out.append((leaf.name + suffix, leaf))
                BUILT_WITH[leaf.name + suffix] = (name, settings)
    return out


LEAVES = leaves()
IDS = [name for name, _ in LEAVES]


def chunk(length: int, seed: int) -> TextChunk:
    """A chunk of ordinary tokens with a sentence boundary, and another document."""
    draw = np.random.default_rng(seed)
    ordinary = VOCAB.ordinary_ids
    tokens = ordinary[draw.integers(0, len(ordinary), length)]
    starts = np.array([0, length // 2], np.int32)
    return TextChunk(tokens, starts, ordinary[draw.integers(0, len(ordinary), 60)])


def examples(leaf: objectives.Objective, count: int = 6, seed: int = 0) -> list[objectives.Example]:
    budget = min(leaf.text_budget(SEQ_LEN // 2), 40)
    draw = np.random.default_rng(seed)
    return [leaf(chunk(int(draw.integers(max(leaf.min_text_tokens, 8), budget + 1)), seed + i), draw)
            for i in range(count)]


@pytest.mark.parametrize("name, leaf", LEAVES, ids=IDS)
def test_the_declared_special_tokens_are_the_ones_it_uses(name, leaf):
    """Every named special token in its examples is declared (sentinels and paradigm
    tokens aside, which its builder asks for), and a vocabulary without a declared
    one is refused when the objective is built, naming the objective and the token."""
    fixed = {VOCAB.tokens[token]: token for token in objectives.vocab.SPECIAL_TOKENS if token != "[PAD]"}
    used = {fixed[int(i)] for example in examples(leaf, 20) for i in example.inputs if int(i) in fixed}
    assert used <= leaf.special_tokens, (name, used - leaf.special_tokens)
    registered, settings = BUILT_WITH[name]
    for token in sorted(leaf.special_tokens):
        lacking = objectives.Vocabulary(SIZE, tokens={k: v for k, v in VOCAB.tokens.items() if k != token})
        with pytest.raises(ValueError, match=rf"the tokenizer has no {re.escape(token)} token and "
                                             rf"objective '{registered}"):
            objectives.build_mixture(registered, lacking, {registered: settings})


@pytest.mark.parametrize("name, leaf", LEAVES, ids=IDS)
def test_examples_use_only_the_declared_kinds_and_types(name, leaf):
    for example in examples(leaf, 20):
        assert set(example.attention_kind.tolist()) <= set(leaf.attention_kinds), name
        assert set(example.token_types.tolist()) <= set(leaf.token_types), name
        assert len(example) <= SEQ_LEN // 2
        # it trains something: tokens through the body's vocabulary, or a loss term (ELECTRA's, on every token)
        taken = [(example.extras[term.marker[0]] != term.marker[1]).any() for term in leaf.loss_terms]
        assert (example.weights.sum() > 0 or any(taken)) and (example.objective_id == 0).all()


def packed(leaf: objectives.Objective, made: list) -> dict[str, np.ndarray]:
    """`made` packed into rows of SEQ_LEN with the fields of the leaf's loss terms."""
    return pack(made, SEQ_LEN, term_fields=objectives.terms.term_fields(leaf.loss_terms))


@pytest.mark.parametrize("name, leaf", LEAVES, ids=IDS)
def test_examples_carry_exactly_the_fields_of_their_loss_terms(name, leaf):
    fields = {field for term in leaf.loss_terms for field, _ in term.fields}
    made = examples(leaf, 20)
    for example in made:
        assert set(example.extras) == fields, name
    for term in leaf.loss_terms:  # each term is taken somewhere, and its head exists
        marker, fill = term.marker
        assert any((example.extras[marker] != fill).any() for example in made), (name, term.name)
        assert term.head in heads.head_names(), (name, term.head)


@pytest.mark.parametrize("name, leaf", LEAVES, ids=IDS)
def test_packed_rows_give_the_examples_back_intact(name, leaf):
    made = examples(leaf, 8)
    fields = objectives.terms.term_fields(leaf.loss_terms)
    batch = packed(leaf, made)
    found = []
    for row in range(len(batch["inputs"])):
        segments = batch["segment_ids"][row]
        for segment in range(1, segments.max() + 1):
            where = segments == segment
            found.append({field: batch[field][row][where] for field in (*objectives.TOKEN_FIELDS, *fields)})
        for field, fill in fields.items():  # padding carries no term
            assert (batch[field][row][segments == 0] == fill).all(), (name, field)
    assert len(found) == len(made)
    for example in made:
        assert any(all(np.array_equal(f[field], values) for field, values in example.fields().items())
                   for f in found), name
    assert set(PACKED_FIELDS) | set(fields) == set(batch)


LAYERS = preset("tiny", vocab_size=SIZE).num_layers


@pytest.fixture(scope="module")
def model():
    return create_model(preset("tiny", vocab_size=SIZE, max_positions=SEQ_LEN, heads=heads.head_names()), seed=1)


@pytest.fixture(scope="module")
def hidden_of(model):
    """Hidden states under each attention path, with the same parameters."""
    graphdef, state = nnx.split(model)
    flash = create_model(preset("tiny", vocab_size=SIZE, max_positions=SEQ_LEN, heads=heads.head_names(),
                                attention="flash"))
    flash_graphdef = nnx.graphdef(flash)
    return {"dense": jax.jit(lambda batch: nnx.merge(graphdef, state)(batch)),
            "flash": jax.jit(lambda batch: nnx.merge(flash_graphdef, state)(batch))}


@pytest.mark.parametrize("name, leaf", LEAVES, ids=IDS)
def test_key_ranges_are_the_rule_or_the_run_falls_back(name, leaf):
    """Where the declared kinds promise key ranges, every real query's range holds
    exactly the keys the rule lets it see, on packed rows of the objective's examples;
    where they do not, 'flash' and 'auto' fall back to 'dense' with a reason."""
    if not has_key_ranges(leaf.attention_kinds):
        for requested in ("flash", "auto"):
            chosen, reason = choose_attention(requested, leaf.attention_kinds)
            assert chosen == "dense" and "falls back to 'dense'" in reason, name
        return
    assert choose_attention("flash", leaf.attention_kinds) == ("flash", None)
    for seed in range(4):
        batch = packed(leaf, examples(leaf, 8, seed=seed))
        segments, kinds = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["attention_kind"])
        visible = np.asarray(attention_mask(segments, kinds))[:, 0]
        start, end = (np.asarray(x) for x in key_ranges(segments, kinds))
        slots = np.arange(SEQ_LEN)
        in_range = (slots[None, None, :] >= start[:, :, None]) & (slots[None, None, :] < end[:, :, None])
        real = batch["segment_ids"] > 0
        np.testing.assert_array_equal(in_range[real], visible[real], err_msg=name)


@pytest.mark.parametrize("attention", ["dense", "flash"])
@pytest.mark.parametrize("name, leaf", LEAVES, ids=IDS)
def test_nothing_leaks_through_the_model(name, leaf, attention, hidden_of):
    """A query's hidden state is bit-identical when any token it cannot reach changes, and
    differs when a token it sees changes. Through L layers a query reaches what it sees,
    what those see, and so on L times (an ENCODER_ONLY token hidden from the decoder
    still reaches it through the source tokens that see it)."""
    batch = {k: v[:1] for k, v in packed(leaf, examples(leaf, 3, seed=5)).items()}
    visible = np.asarray(attention_mask(jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["attention_kind"])))[0, 0]
    reach = reach_through_layers(visible, LAYERS)
    real = np.flatnonzero(batch["segment_ids"][0] > 0)
    draw = np.random.default_rng(1)
    variants, checks = [], []
    for query in draw.choice(real, size=min(8, len(real)), replace=False):
        hidden_keys = [j for j in real if not reach[query, j]]
        seen_keys = [j for j in real if visible[query, j] and j != query]
        for key, must_change in ((draw.choice(hidden_keys) if hidden_keys else None, False),
                                 (draw.choice(seen_keys) if seen_keys else None, True)):
            if key is None:
                continue
            changed = batch["inputs"].copy()
            changed[0, key] = VOCAB.ordinary_ids[(np.searchsorted(VOCAB.ordinary_ids, changed[0, key]) + 7)
                                                 % len(VOCAB.ordinary_ids)]
            variants.append(changed[0])
            checks.append((query, must_change))
    stacked = {k: np.repeat(v, len(variants) + 1, axis=0) for k, v in batch.items()}
    stacked["inputs"] = np.stack([batch["inputs"][0], *variants])
    if attention == "flash" and not has_key_ranges(leaf.attention_kinds):
        pytest.skip(f"{name}: its layout has no key ranges, so its runs take the dense path (tested above)")
    hidden = np.asarray(hidden_of[attention](stacked))
    for index, (query, must_change) in enumerate(checks, start=1):
        same = np.array_equal(hidden[index, query], hidden[0, query])
        assert same != must_change, (name, query, must_change)


@pytest.fixture(scope="module")
def overfit_step():
    model = create_model(preset("tiny", vocab_size=SIZE, max_positions=SEQ_LEN, heads=heads.head_names()), seed=2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adam(1e-2)

    def step_of(terms):
        """The step training the token loss and the objective's own loss terms."""

        @jax.jit
        def step(params, opt_state, batch):
            loss_of = lambda p: batch_loss(nnx.merge(graphdef, p, rest), batch, 1, terms=terms)[0]  # noqa: E731
            loss, grads = jax.value_and_grad(loss_of)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        return step

    return params, optimizer, step_of


@pytest.mark.parametrize("name, leaf", LEAVES, ids=IDS)
def test_a_tiny_model_overfits_one_batch(name, leaf, overfit_step):
    params, optimizer, step_of = overfit_step
    step = step_of(leaf.loss_terms)
    batch = {k: v[:2] for k, v in packed(leaf, examples(leaf, 6, seed=3)).items()}
    opt_state, losses = optimizer.init(params), []
    for _ in range(100):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.4 * np.mean(losses[:3]), (name, losses[:3],
                                                                                            losses[-5:])


@pytest.mark.parametrize("name, leaf", LEAVES, ids=IDS)
def test_generation_works_in_every_mode_of_its_layout(name, leaf, model):
    prompt = VOCAB.ordinary_ids[10:17]
    for mode in leaf.generation_modes():
        if mode == "fill":
            text = np.concatenate([prompt[:3], [VOCAB.mask], prompt[3:5], [VOCAB.mask], prompt[5:]])
            filled = gen.fill(model, [text], leaf, max_new_tokens=8)[0]
            keep = text != VOCAB.mask
            if len(filled) == len(text):  # one pass: only the [MASK]s change
                np.testing.assert_array_equal(filled[keep], text[keep])
            assert not (filled == VOCAB.mask).any() and not VOCAB.is_special(filled).any(), (name, filled)
        else:
            made = gen.generate(model, [leaf.prompt(mode, prompt, 5)], vocab=VOCAB)[0]
            assert 1 <= len(made) <= 5 and not VOCAB.is_special(made[:-1]).any(), (name, mode, made)
    # every objective generates, but UniLM's single modes (the mixture does) and an objective whose body predicts
    # no token through the vocabulary (ELECTRA's discriminator, scored by its loss term)
    assert leaf.generation_modes() or name.startswith("unilm/") or leaf.held_out_term, \
        f"{name} offers no generation mode"
