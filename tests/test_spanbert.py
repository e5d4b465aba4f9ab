"""SpanBERT's span masking: the exact layout, the merge rule, the budget, whole words,
and its statistics (geometric lengths, 80/10/10 per span) over 10,000 draws."""

import math

import numpy as np
import pytest

import objectives
from objectives.example import PREFIX, TextChunk
from objectives.spanbert import merge_spans, sbo_fields, span_length_probabilities

VOCAB = objectives.Vocabulary.reserved(300, sentinels=0, word_start=np.arange(300) % 3 == 0)
CLS, SEP, MASK = VOCAB.cls, VOCAB.sep, VOCAB.mask


def leaf(**settings):
    return objectives.build_mixture("spanbert", VOCAB, {"spanbert": settings}).objectives[0]


def four_binomial_std(expected: float, draws: int) -> float:
    return 4 * math.sqrt(expected * (1 - expected) / draws)


def test_the_example_is_cls_text_sep_predicting_exactly_the_masked_tokens():
    text = np.arange(201, 221)  # 20 tokens: ceil(0.15 x 20) = 3 masked
    example = leaf(mask_token_rate=1.0, random_token_rate=0.0)(TextChunk(text), np.random.default_rng(0))
    masked = example.weights[1:-1] > 0
    assert example.targets.tolist() == [CLS, *text, SEP]
    assert example.weights[0] == example.weights[-1] == 0 and masked.sum() == 3
    assert example.inputs.tolist() == [CLS, *np.where(masked, MASK, text), SEP]
    assert example.attention_kind.tolist() == [PREFIX] * 22 and example.token_types.tolist() == [0] * 22
    assert example.positions.tolist() == list(range(22))


def test_spans_that_overlap_or_touch_merge():
    assert merge_spans([(5, 7), (0, 2), (2, 3), (6, 9), (11, 12)]) == [(0, 3), (5, 9), (11, 12)]


def test_the_length_distribution_is_the_clipped_geometric_of_mean_3_8():
    probabilities = span_length_probabilities(0.2, 10)
    expected = np.array([0.2 * 0.8 ** (k - 1) for k in range(1, 11)])
    np.testing.assert_allclose(probabilities, expected / expected.sum())
    assert round(float(probabilities @ np.arange(1, 11)), 3) == 3.797  # the paper's "mean 3.8"


def test_every_draw_masks_the_budget_in_spans_of_whole_words():
    """Spans start at word starts; only the span the budget cuts may end inside a word."""
    rng = np.random.default_rng(0)
    spanbert = leaf()
    for _ in range(2000):
        length = int(rng.integers(5, 120))
        text = VOCAB.ordinary_ids[rng.integers(0, len(VOCAB.ordinary_ids), length)]
        masked, spans = spanbert.spans(text, rng)
        assert masked.sum() == math.ceil(0.15 * length)
        starts = VOCAB.word_start[text].copy()
        starts[0] = True
        word_ends = np.append(starts[1:], True)  # True where a word ends at this token
        assert all(starts[start] for start, _ in spans)
        assert sum(not word_ends[end - 1] for _, end in spans) <= 1
        covered = np.zeros(length, bool)
        for start, end in spans:
            covered[start:end] = True
        assert (covered == masked).all()


def test_span_lengths_follow_the_clipped_geometric_over_10000_draws():
    """Token-level spans (whole_word off) in a 1000-token text: every span not cut by the
    budget or the text's end has the length drawn; tolerance 4 binomial std per length."""
    rng = np.random.default_rng(1)
    spanbert, lengths = leaf(whole_word=False), []
    text = VOCAB.ordinary_ids[np.arange(1000) % len(VOCAB.ordinary_ids)]
    while len(lengths) < 10_000:
        _, spans = spanbert.spans(text, rng)
        lengths.extend(end - start for start, end in spans[:-1] if end < len(text))  # the last is cut by the budget
    counts = np.bincount(lengths, minlength=12)
    assert counts[0] == counts[11] == 0
    for k, p in enumerate(span_length_probabilities(0.2, 10), start=1):
        assert abs(counts[k] / len(lengths) - p) <= four_binomial_std(p, len(lengths)), k


def test_each_merged_span_is_masked_replaced_or_kept_as_a_whole_80_10_10():
    rng = np.random.default_rng(2)
    spanbert, outcomes = leaf(), {"mask": 0, "random": 0, "kept": 0}
    text = VOCAB.ordinary_ids[np.arange(60) % len(VOCAB.ordinary_ids)]
    while sum(outcomes.values()) < 10_000:
        example = spanbert(TextChunk(text), rng)
        inputs, masked = example.inputs[1:-1], example.weights[1:-1] > 0
        edges = np.flatnonzero(np.diff(np.concatenate([[0], masked.astype(int), [0]])))
        for start, end in zip(edges[::2], edges[1::2]):
            span = inputs[start:end]
            if (span == MASK).all():
                outcomes["mask"] += 1
            elif (span == text[start:end]).all():
                outcomes["kept"] += 1
            else:
                assert not (span == MASK).any() and not VOCAB.is_special(span).any()
                outcomes["random"] += 1
    total = sum(outcomes.values())
    for name, p in (("mask", 0.8), ("random", 0.1), ("kept", 0.1)):
        # a random token equals the original 1 time in ~290, well inside the tolerance
        assert abs(outcomes[name] / total - p) <= four_binomial_std(p, total) + 0.001, (name, outcomes)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match=r"spanbert.geometric_p=0 must lie in \(0, 1\]"):
        leaf(geometric_p=0)
    with pytest.raises(ValueError, match="whole-word masking needs the vocabulary's word_start table"):
        objectives.build_mixture("spanbert", objectives.Vocabulary(300)).objectives[0](
            TextChunk(np.arange(200, 220)), np.random.default_rng(0))


# -- the span boundary objective ------------------------------------------------------------


def test_sbo_fields_give_each_target_its_distances_to_the_boundaries_literal():
    # Text of 10 tokens at example positions 1..10 ([CLS] at 0, [SEP] at 11), merged
    # spans [0, 2), [4, 7), [9, 10), at most 2 targets per span: [0, 2) starts the text
    # and [9, 10) ends it (a boundary would be [CLS] / [SEP]), so only [4, 7) is a
    # target span, and only its first two tokens 4 and 5 (positions 5 and 6); its
    # boundaries are text tokens 3 and 7 (positions 4 and 8).
    fields = sbo_fields([(0, 2), (4, 7), (9, 10)], text_length=10, max_targets=2)
    assert fields["sbo_left"].tolist() == [0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0]
    assert fields["sbo_right"].tolist() == [0, 0, 0, 0, 0, 3, 2, 0, 0, 0, 0, 0]


def test_the_example_carries_the_sbo_fields_of_its_merged_spans_and_sbo_false_none():
    text = np.arange(201, 241)
    example = leaf()(TextChunk(text), np.random.default_rng(3))
    left, right = example.extras["sbo_left"], example.extras["sbo_right"]
    targets = np.flatnonzero(left)
    assert len(targets) > 0 and (example.weights[targets] == 1).all()  # SBO targets are masked tokens
    for position in targets:  # the boundaries are unmasked text tokens, the span between them masked
        low, high = position - left[position], position + right[position]
        assert example.weights[low] == 0 and example.weights[high] == 0 and 1 <= low and high <= len(text)
        assert (example.weights[low + 1:high] == 1).all() and left[position] <= 15
    assert leaf(sbo=False)(TextChunk(text), np.random.default_rng(3)).extras == {}
    assert leaf().loss_terms[0].weight == 1.0 and leaf(sbo_weight=0.5).loss_terms[0].weight == 0.5


def test_the_span_boundary_head_equals_a_numpy_reference_and_reads_only_the_boundaries():
    import jax
    import jax.numpy as jnp

    from pretrain.model import create_model, preset

    model = create_model(preset("tiny", vocab_size=300, max_positions=32, heads=("span_boundary",), gelu="exact"),
                         seed=4)
    head, term = model.head("span_boundary"), leaf().loss_terms[0]
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((1, 12, model.config.model_dim)), jnp.float32)
    fields = sbo_fields([(4, 7)], text_length=10, max_targets=15)
    batch = {"sbo_left": jnp.asarray(fields["sbo_left"])[None], "sbo_right": jnp.asarray(fields["sbo_right"])[None],
             "targets": jnp.asarray(rng.integers(7, 300, 12), jnp.int32)[None]}
    stats = head.statistics(model, hidden, batch, term)

    def layer_norm(x):
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + model.config.layer_norm_epsilon)

    def gelu(x):
        return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))

    p = {name: np.asarray(getattr(head, name)[...], np.float64) for name in
         ("position_embedding", "kernel_1", "bias_1", "kernel_2", "bias_2", "output_bias")}
    h, losses, correct = np.asarray(hidden[0], np.float64), [], 0
    for position, inside in ((5, 0), (6, 1), (7, 2)):  # text tokens 4, 5, 6; boundaries at positions 4 and 8
        x = np.concatenate([h[4], h[8], p["position_embedding"][inside]])
        x = layer_norm(gelu(x @ p["kernel_1"] + p["bias_1"]))  # the norms start at scale 1, bias 0
        x = layer_norm(gelu(x @ p["kernel_2"] + p["bias_2"]))
        logits = x @ np.asarray(model.token_embedding[...], np.float64).T + p["output_bias"]
        target = int(batch["targets"][0, position])
        losses.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[target])
        correct += int(logits.argmax() == target)
    assert float(stats["weight_sum"]) == 3 and float(stats["correct_sum"]) == correct
    np.testing.assert_allclose(float(stats["loss_sum"]), sum(losses), rtol=1e-5)
    # The loss reads the boundary states only, never a target's own state.
    grad = jax.grad(lambda x: head.statistics(model, x, batch, term)["loss_sum"])(hidden)
    touched = np.flatnonzero(np.abs(np.asarray(grad[0])).sum(axis=-1) > 0)
    assert touched.tolist() == [4, 8]
