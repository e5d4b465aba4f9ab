"""Objectives, exactly: literal examples on tiny inputs, budgets, errors, registry, mixtures.

Every literal below was produced by running the code with the stated seed and then
checked by hand against DESIGN.md section 4 and the module docstrings; the comment in
each test says why it is right. Ids 0..6 are the specials of `objectives.vocab`:
[PAD]=0 [UNK]=1 [BOS]/[SOS]=2 [EOS]=3 [CLS]=4 [SEP]=5 [MASK]=6. Text tokens are
50.. so they can never be confused with a special id.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import objectives
from objectives import ENCODER_ONLY, L2R, PREFIX, R2L, TextChunk, Vocabulary, build_mixture
from objectives.vocab import BOS_ID, CLS_ID, EOS_ID, MASK_ID, SEP_ID
from pretrain.model import create_model, preset
from pretrain.packing import pack

PAD, UNK, BOS, EOS, CLS, SEP, MASK = 0, 1, 2, 3, 4, 5, 6
VOCAB = Vocabulary(size=100)
TEXT = np.arange(50, 70, dtype=np.int32)  # 20 ordinary tokens: 50, 51, ..., 69
UNILM_MODES = ("bidirectional", "seq2seq", "left_to_right", "right_to_left")


def leaf(name, settings=None, vocab=VOCAB, index=0):
    """Leaf `index` of the mixture of the single objective `name`."""
    return build_mixture(name, vocab, {name: settings} if settings else None).objectives[index]


def unilm_leaf(mode, settings=None):
    return leaf("unilm", settings, index=UNILM_MODES.index(mode))


def rng(seed):
    return np.random.default_rng(seed)


def assert_example(ex, *, inputs, targets, weights, positions, attention_kind, token_types,
                   objective_id, nsp_label=None):
    expected = dict(inputs=inputs, targets=targets, weights=weights, positions=positions,
                    attention_kind=attention_kind, token_types=token_types,
                    objective_id=objective_id)
    for name, value in expected.items():
        np.testing.assert_array_equal(getattr(ex, name), value, err_msg=name)
    if nsp_label is None:
        assert ex.extras == {}
    else:  # NSP's field: the label at the pair's first token, -1 elsewhere
        np.testing.assert_array_equal(ex.extras["nsp_labels"], [nsp_label] + [-1] * (len(ex) - 1))
    assert ex.inputs.dtype == np.int32 and ex.weights.dtype == np.float32


def test_special_ids_match_the_table_this_file_assumes():
    assert objectives.SPECIAL_TOKENS == {"[PAD]": PAD, "[UNK]": UNK, "[BOS]": BOS, "[EOS]": EOS,
                                         "[CLS]": CLS, "[SEP]": SEP, "[MASK]": MASK}
    assert (BOS_ID, EOS_ID, CLS_ID, SEP_ID, MASK_ID) == (BOS, EOS, CLS, SEP, MASK)
    np.testing.assert_array_equal(VOCAB.ordinary_ids, np.arange(7, 100))


# ---------------------------------------------------------------------------------------
# MLM


def test_mlm_default_literal():
    ex = leaf("mlm")(TextChunk(TEXT), rng(0))
    # [CLS] 50..69 [SEP]: 22 tokens, 20 ordinary -> round(0.15 * 20) = 3 predictions,
    # at positions 11 (60 -> [MASK]), 13 (62 -> 53, a random ordinary id) and
    # 16 (65, kept). Targets are the uncorrupted sequence, every other input equals its
    # target, [CLS]/[SEP] are never predicted; all PREFIX, type 0, no NSP label.
    assert_example(
        ex,
        inputs=[4, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 6, 61, 53, 63, 64, 65, 66, 67, 68, 69, 5],
        targets=[4, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 5],
        weights=[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0],
        positions=list(range(22)),
        attention_kind=[0] * 22,
        token_types=[0] * 22,
        objective_id=[0] * 22,
    )


NSP_CHUNK = TextChunk(TEXT, sentence_starts=[0, 6, 13], other_document=np.arange(80, 100))


def test_mlm_nsp_negative_literal():
    ex = leaf("mlm", {"nsp": True})(NSP_CHUNK, rng(0))
    # Seed 0 splits at the sentence boundary 13 (one of {6, 13}) and draws a negative:
    # A = 50..62 (13 tokens), B = the first len(true B) = 7 tokens of other_document,
    # 80..86. [CLS] A [SEP] B [SEP] = 1 + 13 + 1 + 7 + 1 = 23 tokens; types 0 for
    # [CLS] A [SEP] (15), 1 for B [SEP] (8). 20 ordinary tokens -> 3 predictions:
    # 1 (50 -> 97 random), 6 (55 kept), 12 (61 -> [MASK]). nsp_label 1 = random B.
    assert_example(
        ex,
        inputs=[4, 97, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 6, 62, 5, 80, 81, 82, 83, 84, 85, 86, 5],
        targets=[4, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 5, 80, 81, 82, 83, 84, 85, 86, 5],
        weights=[0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        positions=list(range(23)),
        attention_kind=[0] * 23,
        token_types=[0] * 15 + [1] * 8,
        objective_id=[0] * 23,
        nsp_label=1,
    )


def test_mlm_nsp_positive_literal():
    ex = leaf("mlm", {"nsp": True})(NSP_CHUNK, rng(1))
    # Seed 1 splits at boundary 6 and keeps the true continuation: A = 50..55,
    # B = 56..69. [SEP]s at 7 and 22; types 0 for positions 0..7, 1 for 8..22.
    # Predictions: 1 (50 -> [MASK]), 3 (52 -> [MASK]), 11 (59 -> 66 random).
    assert_example(
        ex,
        inputs=[4, 6, 51, 6, 53, 54, 55, 5, 56, 57, 58, 66, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 5],
        targets=[4, 50, 51, 52, 53, 54, 55, 5, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 5],
        weights=[0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        positions=list(range(23)),
        attention_kind=[0] * 23,
        token_types=[0] * 8 + [1] * 15,
        objective_id=[0] * 23,
        nsp_label=0,
    )


def test_mlm_nsp_single_sentence_chunk_splits_inside_it():
    objective = leaf("mlm", {"nsp": True})
    for seed in range(50):
        ex = objective(TextChunk(TEXT, other_document=np.arange(80, 100)), rng(seed))
        seps = np.flatnonzero(ex.targets == SEP)
        assert ex.targets[0] == CLS and len(seps) == 2 and seps[1] == len(ex) - 1
        assert 2 <= seps[0] <= 20  # A and B both non-empty
        np.testing.assert_array_equal(ex.targets[1:seps[0]], TEXT[:seps[0] - 1])
        expected_b = TEXT[seps[0] - 1:] if ex.extras["nsp_labels"][0] == 0 else np.arange(80, 80 + 21 - seps[0])
        np.testing.assert_array_equal(ex.targets[seps[0] + 1:-1], expected_b)
        np.testing.assert_array_equal(ex.token_types, [0] * (seps[0] + 1) + [1] * (len(ex) - seps[0] - 1))


WORD_START = np.ones(100, bool)
WORD_START[90:] = False  # ids 90..99 continue the word before them
WORD_VOCAB = Vocabulary(size=100, word_start=WORD_START)
# Words: [50 90 91] [51] [52 92] [53] [54 93 94] [55] [56 95] [57] [58] [59 96] [60] [61] [62]
WORD_TEXT = [50, 90, 91, 51, 52, 92, 53, 54, 93, 94, 55, 56, 95, 57, 58, 59, 96, 60, 61, 62]
# The same words as example positions (text index + 1 for the leading [CLS]).
WORD_GROUPS = [[1, 2, 3], [4], [5, 6], [7], [8, 9, 10], [11], [12, 13], [14], [15], [16, 17],
               [18], [19], [20]]


def test_mlm_whole_word_literal():
    ex = leaf("mlm", {"whole_word": True}, vocab=WORD_VOCAB)(TextChunk(WORD_TEXT), rng(4))
    # 20 pieces -> 3 predictions, made of whole words: [51] at 4 and [59 96] at 16..17
    # (1 + 2 = 3). 51 -> 12 (random ordinary), 59 -> [MASK], 96 kept.
    assert_example(
        ex,
        inputs=[4, 50, 90, 91, 12, 52, 92, 53, 54, 93, 94, 55, 56, 95, 57, 58, 6, 96, 60, 61, 62, 5],
        targets=[4, 50, 90, 91, 51, 52, 92, 53, 54, 93, 94, 55, 56, 95, 57, 58, 59, 96, 60, 61, 62, 5],
        weights=[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
        positions=list(range(22)),
        attention_kind=[0] * 22,
        token_types=[0] * 22,
        objective_id=[0] * 22,
    )


def test_mlm_whole_word_predicts_only_whole_words():
    objective = leaf("mlm", {"whole_word": True}, vocab=WORD_VOCAB)
    for seed in range(200):
        ex = objective(TextChunk(WORD_TEXT), rng(seed))
        chosen = set(np.flatnonzero(ex.weights).tolist())
        # At most round(0.15 * 20) = 3 pieces; a word that would overshoot is skipped.
        assert 1 <= len(chosen) <= 3
        np.testing.assert_array_equal(ex.inputs[ex.weights == 0], ex.targets[ex.weights == 0])
        for group in WORD_GROUPS:  # every word is taken entirely or not at all
            assert set(group) <= chosen or not set(group) & chosen, (seed, group, chosen)


def test_mlm_whole_word_needs_the_word_start_table():
    with pytest.raises(ValueError, match="word_start"):
        leaf("mlm", {"whole_word": True})(TextChunk(TEXT), rng(0))


def test_mlm_structure_when_every_prediction_is_masked():
    # mask_token_rate=1.0 (and random 0): every predicted token is [MASK], whatever the seed.
    objective = leaf("mlm", {"mask_token_rate": 1.0, "random_token_rate": 0.0})
    for n in range(1, 41):
        text = np.arange(50, 50 + n)
        for seed in range(5):
            ex = objective(TextChunk(text), rng(seed))
            predicted = ex.weights == 1
            np.testing.assert_array_equal(ex.targets, [CLS, *text, SEP])
            np.testing.assert_array_equal(ex.inputs, np.where(predicted, MASK, ex.targets))
            assert predicted.sum() == min(80, max(1, (15 * n + 50) // 100))
            assert not predicted[0] and not predicted[-1]
            np.testing.assert_array_equal(ex.positions, np.arange(n + 2))
            assert (ex.attention_kind == PREFIX).all() and (ex.token_types == 0).all()


def test_mlm_never_predicts_special_tokens_in_the_text():
    # An [UNK] (1) and an extra special id (7) inside the text are not candidates and
    # do not count towards n: 20 ordinary tokens -> still exactly 3 predictions.
    vocab = Vocabulary(size=100, extra_special_ids=(7,))
    text = np.concatenate([[UNK, 7], TEXT, [7, UNK]])
    objective = leaf("mlm", vocab=vocab)
    for seed in range(100):
        ex = objective(TextChunk(text), rng(seed))
        assert ex.weights.sum() == 3
        assert not vocab.is_special(ex.targets[ex.weights == 1]).any()
        np.testing.assert_array_equal(ex.inputs[ex.weights == 0], ex.targets[ex.weights == 0])


# ---------------------------------------------------------------------------------------
# Causal LM


def test_clm_literal():
    ex = leaf("clm")(TextChunk([50, 51, 52, 53, 54]), rng(0))
    # [BOS] 50..54 [EOS]: inputs drop the last token, targets drop the first, every
    # target weighted, all L2R, positions from 0.
    assert_example(
        ex,
        inputs=[2, 50, 51, 52, 53, 54],
        targets=[50, 51, 52, 53, 54, 3],
        weights=[1, 1, 1, 1, 1, 1],
        positions=[0, 1, 2, 3, 4, 5],
        attention_kind=[1, 1, 1, 1, 1, 1],
        token_types=[0, 0, 0, 0, 0, 0],
        objective_id=[0, 0, 0, 0, 0, 0],
    )


@pytest.mark.parametrize("n", [1, 2, 7, 31])
def test_clm_structure_is_deterministic(n):
    text = np.random.default_rng(n).integers(7, 100, n)
    generator = rng(123)
    state = generator.bit_generator.state
    ex = leaf("clm")(TextChunk(text), generator)
    assert generator.bit_generator.state == state  # draws nothing
    np.testing.assert_array_equal(ex.inputs, [BOS, *text])
    np.testing.assert_array_equal(ex.targets, [*text, EOS])
    np.testing.assert_array_equal(ex.inputs[1:], ex.targets[:-1])
    np.testing.assert_array_equal(ex.weights, np.ones(n + 1))
    np.testing.assert_array_equal(ex.positions, np.arange(n + 1))
    assert (ex.attention_kind == L2R).all() and (ex.token_types == 0).all()
    for seed in range(3):
        other = leaf("clm")(TextChunk(text), rng(seed))
        for name in objectives.TOKEN_FIELDS:
            np.testing.assert_array_equal(getattr(other, name), getattr(ex, name))


# ---------------------------------------------------------------------------------------
# MASS


def test_mass_literal():
    text = np.arange(50, 60)  # n = 10 -> k = round(0.5 * 10) = 5, u in 1..5
    ex = leaf("mass")(TextChunk(text), rng(0))
    # Seed 0 places the span at u = 3: t[3..7] = 53..57. Encoder (positions 0..9,
    # PREFIX, type 0, weight 0): 53 -> [MASK], 54 -> [MASK], 55 -> 74 (random),
    # 56 kept, 57 -> [MASK]; outside the span the text is untouched. Decoder: inputs
    # t[2..6] = 52..56 (span shifted right), original positions 2..6, L2R, type 1,
    # targets t[3..7] = 53..57, weight 1. The three [MASK]ed encoder positions are
    # ENCODER_ONLY (3): the decoder never attends to them, as in MASS's code.
    assert_example(
        ex,
        inputs=[50, 51, 52, 6, 6, 74, 56, 6, 58, 59, 52, 53, 54, 55, 56],
        targets=[50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 53, 54, 55, 56, 57],
        weights=[0] * 10 + [1] * 5,
        positions=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5, 6],
        attention_kind=[0, 0, 0, 3, 3, 0, 0, 3, 0, 0] + [1] * 5,
        token_types=[0] * 10 + [1] * 5,
        objective_id=[0] * 15,
    )


def test_mass_structure_given_the_span_start():
    objective = leaf("mass", {"mask_token_rate": 1.0, "random_token_rate": 0.0})
    for n in range(2, 41):
        text = np.arange(50, 50 + n)
        k = min(max(1, round(n / 2)), n - 1)  # MASS's Python round: half to even
        for seed in range(5):
            ex = objective(TextChunk(text), rng(seed))
            assert len(ex) == n + k
            u = int(ex.positions[n]) + 1  # the decoder starts at original position u - 1
            assert 1 <= u <= n - k
            span = np.arange(u, u + k)
            encoder = text.copy()
            encoder[span] = MASK
            np.testing.assert_array_equal(ex.inputs, [*encoder, *text[u - 1:u + k - 1]])
            np.testing.assert_array_equal(ex.targets, [*text, *text[u:u + k]])
            np.testing.assert_array_equal(ex.weights, [0] * n + [1] * k)
            np.testing.assert_array_equal(ex.positions, [*range(n), *(span - 1)])
            np.testing.assert_array_equal(ex.attention_kind, [*np.where(encoder == MASK, ENCODER_ONLY, PREFIX),
                                                              *[L2R] * k])
            np.testing.assert_array_equal(ex.token_types, [0] * n + [1] * k)


def test_mass_span_start_and_end_placements():
    objective = leaf("mass")
    always_start = leaf("mass", {"start_rate": 1.0, "end_rate": 0.0})
    always_end = leaf("mass", {"start_rate": 0.0, "end_rate": 1.0})
    for seed in range(20):
        assert always_start.span_start(10, 5, rng(seed)) == 1  # never the first token
        assert always_end.span_start(10, 5, rng(seed)) == 5
        assert 1 <= objective.span_start(10, 5, rng(seed)) <= 5


def test_mass_decoder_never_reads_masked_source_positions_through_the_model():
    """One layer, so a token reaches a query only by direct attention: changing the
    [MASK]-valued encoder tokens leaves every decoder hidden state bit-identical under
    the default, and changes them with decoder_sees_masked_source."""
    model = create_model(preset("tiny", vocab_size=VOCAB.size, max_positions=64, num_layers=1), seed=0)
    text = np.arange(50, 70)
    for sees, must_change in ((False, False), (True, True)):
        settings = {"mask_token_rate": 1.0, "random_token_rate": 0.0, "decoder_sees_masked_source": sees}
        row = pack([leaf("mass", settings)(TextChunk(text), rng(3))], 32)
        decoder = np.flatnonzero(row["attention_kind"][0] == L2R)
        masked = np.flatnonzero(row["inputs"][0] == MASK)
        assert len(decoder) == 10 and len(masked) == 10
        changed = {name: value.copy() for name, value in row.items()}
        changed["inputs"][0, masked] = 60
        before, after = (np.asarray(model({k: jnp.asarray(v) for k, v in batch.items()})) for batch in (row, changed))
        assert np.array_equal(before[0, decoder], after[0, decoder]) != must_change
        assert not np.array_equal(before[0, masked[0] - 1], after[0, masked[0] - 1])  # the source does read them


def test_mass_rejects_bad_settings():
    with pytest.raises(ValueError, match="span_fraction"):
        leaf("mass", {"span_fraction": 1.0})
    with pytest.raises(ValueError, match="start_rate"):
        leaf("mass", {"start_rate": 0.7, "end_rate": 0.7})
    with pytest.raises(ValueError, match="mask_rate"):  # 1.0 + the default 0.1 random > 1
        leaf("mass", {"mask_token_rate": 1.0})


# ---------------------------------------------------------------------------------------
# UniLM

UNILM_CHUNK = TextChunk(TEXT, sentence_starts=[0, 8])  # one boundary: A = 50..57, B = 58..69


def test_unilm_bidirectional_literal():
    ex = unilm_leaf("bidirectional")(UNILM_CHUNK, rng(6))
    # [SOS] A [EOS] B [EOS]: [SOS] at 0, A = 50..57 at 1..8, [EOS] at 9, B = 58..69 at
    # 10..21, [EOS] at 22. 20 ordinary -> 3 masked: 3 (52 -> [MASK]),
    # 19 (67 -> 65 random), 21 (69 -> [MASK]). All PREFIX; types 0 for [SOS] A [EOS]
    # (10), 1 for B [EOS] (13). Leaf 0 of the UniLM mixture; no NSP by default.
    assert_example(
        ex,
        inputs=[2, 50, 51, 6, 53, 54, 55, 56, 57, 3, 58, 59, 60, 61, 62, 63, 64, 65, 66, 65, 68, 6, 3],
        targets=[2, 50, 51, 52, 53, 54, 55, 56, 57, 3, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 3],
        weights=[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0],
        positions=list(range(23)),
        attention_kind=[0] * 23,
        token_types=[0] * 10 + [1] * 13,
        objective_id=[0] * 23,
    )


def test_unilm_seq2seq_literal():
    ex = unilm_leaf("seq2seq")(UNILM_CHUNK, rng(3))
    # Same layout as bidirectional. Masked: a bigram 10..11 (58, 59 -> [MASK] [MASK])
    # and 19 (67 -> [MASK]). Source [SOS] A [EOS] PREFIX with type 4, target B [EOS]
    # L2R with type 5. Leaf 1.
    assert_example(
        ex,
        inputs=[2, 50, 51, 52, 53, 54, 55, 56, 57, 3, 6, 6, 60, 61, 62, 63, 64, 65, 66, 6, 68, 69, 3],
        targets=[2, 50, 51, 52, 53, 54, 55, 56, 57, 3, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 3],
        weights=[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        positions=list(range(23)),
        attention_kind=[0] * 10 + [1] * 13,
        token_types=[4] * 10 + [5] * 13,
        objective_id=[1] * 23,
    )


def test_unilm_left_to_right_literal():
    ex = unilm_leaf("left_to_right")(UNILM_CHUNK, rng(5))
    # One segment [SOS] 50..69 [EOS] (22 tokens; the sentence boundary is ignored).
    # Masked: 4 (53 -> 68 random), 10 (59 -> [MASK]), 19 (68 -> [MASK]); loss only
    # there (cloze). All L2R, type 2. Leaf 2.
    assert_example(
        ex,
        inputs=[2, 50, 51, 52, 68, 54, 55, 56, 57, 58, 6, 60, 61, 62, 63, 64, 65, 66, 67, 6, 69, 3],
        targets=[2, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 3],
        weights=[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
        positions=list(range(22)),
        attention_kind=[1] * 22,
        token_types=[2] * 22,
        objective_id=[2] * 22,
    )


def test_unilm_right_to_left_literal():
    ex = unilm_leaf("right_to_left")(UNILM_CHUNK, rng(2))
    # One segment [SOS] 50..69 [EOS]. Masked: a trigram 7..9 (56, 57, 58, all
    # [MASK]). All R2L, type 3. Leaf 3.
    assert_example(
        ex,
        inputs=[2, 50, 51, 52, 53, 54, 55, 6, 6, 6, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 3],
        targets=[2, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 3],
        weights=[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        positions=list(range(22)),
        attention_kind=[2] * 22,
        token_types=[3] * 22,
        objective_id=[3] * 22,
    )


# Per mode: (pair layout, kind of [SOS] A [EOS], kind of B [EOS], type A, type B).
UNILM_TABLE = {
    "bidirectional": (True, PREFIX, PREFIX, 0, 1),
    "seq2seq": (True, PREFIX, L2R, 4, 5),
    "left_to_right": (False, L2R, L2R, 2, 2),
    "right_to_left": (False, R2L, R2L, 3, 3),
}


@pytest.mark.parametrize("mode", UNILM_MODES)
def test_unilm_structure_when_every_masked_token_is_masked(mode):
    pair, kind_a, kind_b, type_a, type_b = UNILM_TABLE[mode]
    objective = unilm_leaf(mode, {"mask_token_rate": 1.0, "random_token_rate": 0.0})
    chunk = TextChunk(TEXT, sentence_starts=[0, 5, 12])
    for seed in range(30):
        ex = objective(chunk, rng(seed))
        if pair:
            split = int(np.flatnonzero(ex.targets == EOS)[0])  # [SOS] A [EOS] ends here
            assert split - 1 in (5, 12)  # A ends at a sentence boundary
            np.testing.assert_array_equal(ex.targets, [BOS, *TEXT[:split - 1], EOS, *TEXT[split - 1:], EOS])
        else:
            split = len(TEXT) + 1
            np.testing.assert_array_equal(ex.targets, [BOS, *TEXT, EOS])
        masked = ex.weights == 1
        assert masked.sum() == 3 and not VOCAB.is_special(ex.targets[masked]).any()
        np.testing.assert_array_equal(ex.inputs, np.where(masked, MASK, ex.targets))
        np.testing.assert_array_equal(ex.positions, np.arange(len(ex)))
        rest = len(ex) - split - 1
        np.testing.assert_array_equal(ex.attention_kind, [kind_a] * (split + 1) + [kind_b] * rest)
        np.testing.assert_array_equal(ex.token_types, [type_a] * (split + 1) + [type_b] * rest)
        assert (ex.objective_id == UNILM_MODES.index(mode)).all()
        assert ex.extras == {}


def test_unilm_nsp_only_in_the_bidirectional_mode():
    mixture = build_mixture("unilm", VOCAB, {"unilm": {"nsp": True}})
    assert [o.needs_other_document for o in mixture.objectives] == [True, False, False, False]
    assert mixture.needs_other_document
    chunk = TextChunk(TEXT, sentence_starts=[0, 8], other_document=np.arange(80, 100))
    labels = {mixture.objectives[0](chunk, rng(seed)).extras["nsp_labels"][0] for seed in range(40)}
    assert labels == {0, 1}
    for seed in range(40):
        ex = mixture.objectives[0](chunk, rng(seed))
        expected_b = np.arange(58, 70) if ex.extras["nsp_labels"][0] == 0 else np.arange(80, 92)
        np.testing.assert_array_equal(ex.targets[10:22], expected_b)
        for other in mixture.objectives[1:]:
            assert other(chunk, rng(seed)).extras == {}
    with pytest.raises(ValueError, match="other_document"):
        mixture.objectives[0](UNILM_CHUNK, rng(0))
    mixture.objectives[1](UNILM_CHUNK, rng(0))  # seq2seq never needs it


# ---------------------------------------------------------------------------------------
# Budgets and errors


def budget_cases():
    mlm = leaf("mlm")
    nsp = leaf("mlm", {"nsp": True})
    unilm = build_mixture("unilm", VOCAB).objectives
    return {"mlm": mlm, "mlm+nsp": nsp, "clm": leaf("clm"), "mass": leaf("mass"),
            **{o.name: o for o in unilm}}


def test_text_budgets_at_128():
    cases = budget_cases()
    expected = {"mlm": 126, "mlm+nsp": 125, "clm": 127,
                "unilm/bidirectional": 125, "unilm/seq2seq": 125,
                "unilm/left_to_right": 126, "unilm/right_to_left": 126}
    # MASS: the largest n with n + round_half_up(n / 2) <= 128, i.e. 85 + 43 = 128.
    expected["mass"] = max(n for n in range(2, 129) if n + (n + 1) // 2 <= 128)
    assert expected["mass"] == 85
    assert {name: o.text_budget(128) for name, o in cases.items()} == expected


@pytest.mark.parametrize("seq_len", [8, 17, 64, 128])
@pytest.mark.parametrize("name", ["mlm", "mlm+nsp", "clm", "mass", "unilm/bidirectional",
                                  "unilm/seq2seq", "unilm/left_to_right", "unilm/right_to_left"])
def test_examples_fit_their_budget_and_the_budget_is_tight(name, seq_len):
    objective = budget_cases()[name]
    budget = objective.text_budget(seq_len)
    other = np.arange(7, 7 + 200) % 93 + 7
    for n, fits in ((budget, True), (budget + 1, False)):
        text = np.arange(n) % 90 + 8
        for seed in range(4):
            ex = objective(TextChunk(text, other_document=other), rng(seed))
            assert (len(ex) <= seq_len) == fits, (n, len(ex))


@pytest.mark.parametrize("name, settings, index, shortest", [
    ("mlm", None, 0, 1),
    ("mlm", {"nsp": True}, 0, 2),
    ("clm", None, 0, 1),
    ("mass", None, 0, 2),
    ("unilm", None, 0, 2),
    ("unilm", None, 1, 2),
    ("unilm", None, 2, 1),
    ("unilm", None, 3, 1),
])
def test_too_short_chunks_raise_naming_the_objective(name, settings, index, shortest):
    objective = leaf(name, settings, index=index)
    other = np.arange(80, 100)
    with pytest.raises(ValueError, match=f"objective '{objective.name}'"):
        objective(TextChunk(TEXT[:shortest - 1], other_document=other), rng(0))
    objective(TextChunk(TEXT[:shortest], other_document=other), rng(0))  # the shortest is fine


def test_nsp_without_other_document_raises():
    objective = leaf("mlm", {"nsp": True})
    assert objective.needs_other_document
    with pytest.raises(ValueError, match="'mlm'.*other_document"):
        objective(TextChunk(TEXT, sentence_starts=[0, 8]), rng(0))


def test_vocabulary_validation():
    with pytest.raises(ValueError, match="special"):
        Vocabulary(size=7)
    with pytest.raises(ValueError, match="word_start"):
        Vocabulary(size=10, word_start=np.ones(9, bool))


# ---------------------------------------------------------------------------------------
# Registry and mixture specs


def test_registered_names_and_defaults():
    assert {"clm", "mass", "mlm", "unilm"} <= set(objectives.registered_names())
    assert list(objectives.registered_names()) == sorted(objectives.registered_names())
    assert objectives.default_settings("mlm") == {
        "mask_rate": 0.15, "max_predictions": 80, "mask_token_rate": 0.8,
        "random_token_rate": 0.1, "whole_word": False, "nsp": False, "nsp_negative_rate": 0.5}
    assert objectives.default_settings("mass")["span_fraction"] == 0.5
    assert objectives.make_settings("mlm", {"nsp": True}).nsp is True


def test_unknown_objective_lists_the_known_ones():
    for call in (lambda: build_mixture("bert", VOCAB), lambda: objectives.lookup("bert"),
                 lambda: build_mixture("mlm:1,bert:1", VOCAB)):
        with pytest.raises(ValueError, match="'bert'.*clm, electra, mass, mlm, .*unilm"):
            call()


def test_unknown_setting_names_the_field():
    with pytest.raises(ValueError, match="'mlm' has no setting 'mask_prob'.*valid settings: .*mask_rate"):
        build_mixture("mlm", VOCAB, {"mlm": {"mask_prob": 0.2}})
    with pytest.raises(ValueError, match="'max_spam'"):
        objectives.make_settings("unilm", {"max_spam": 2})


def test_parse_mixture_spec_forms():
    assert objectives.parse_mixture_spec("mlm") == {"mlm": 1.0}
    assert objectives.parse_mixture_spec("mlm+clm") == {"mlm": 1.0, "clm": 1.0}
    assert objectives.parse_mixture_spec("mlm:3,clm:1") == {"mlm": 3.0, "clm": 1.0}
    assert objectives.parse_mixture_spec(" mlm : 3 , clm ") == {"mlm": 3.0, "clm": 1.0}
    assert objectives.parse_mixture_spec({"mlm": 2, "unilm": 1}) == {"mlm": 2.0, "unilm": 1.0}
    with pytest.raises(ValueError, match="rate 'three' of 'mlm' is not a number"):
        objectives.parse_mixture_spec("mlm:three,clm:1")
    with pytest.raises(ValueError, match="names no objective"):
        objectives.parse_mixture_spec("")
    for bad in ("mlm:0", "mlm:-1,clm:1", "mlm:inf,clm:1", "mlm:nan"):
        with pytest.raises(ValueError, match="rates must be finite and > 0"):
            build_mixture(bad, VOCAB)
    with pytest.raises(ValueError, match="names 'mlm' twice"):
        objectives.parse_mixture_spec("mlm:1,mlm:2")
    # Settings for a misspelt objective are an error, not silently ignored.
    with pytest.raises(ValueError, match="unknown objective 'mlmm'"):
        build_mixture("clm", VOCAB, {"mlmm": {"mask_rate": 0.2}})


def test_mixture_leaf_numbering_and_rates():
    mixture = build_mixture("mlm:2,unilm:1,clm:1", VOCAB)
    assert mixture.names == ("mlm", "unilm/bidirectional", "unilm/seq2seq",
                             "unilm/left_to_right", "unilm/right_to_left", "clm")
    assert [o.objective_id for o in mixture.objectives] == list(range(6))
    # mlm 2/4; unilm's 1/4 split 1/3, 1/3, 1/6, 1/6; clm 1/4.
    np.testing.assert_allclose(mixture.rates, [1 / 2, 1 / 12, 1 / 12, 1 / 24, 1 / 24, 1 / 4])
    chunk = TextChunk(TEXT, sentence_starts=[0, 8])
    for index, objective in enumerate(mixture.objectives):
        assert (objective(chunk, rng(index)).objective_id == index).all()

    unilm = build_mixture("unilm", VOCAB)
    assert unilm.names == tuple(f"unilm/{mode}" for mode in UNILM_MODES)
    np.testing.assert_allclose(unilm.rates, [1 / 3, 1 / 3, 1 / 6, 1 / 6])
    # A mode with rate 0 is dropped and the rest are renumbered without gaps.
    three = build_mixture("clm+unilm", VOCAB, {"unilm": {"seq2seq_rate": 0.0}})
    assert three.names == ("clm", "unilm/bidirectional", "unilm/left_to_right", "unilm/right_to_left")
    assert [o.objective_id for o in three.objectives] == [0, 1, 2, 3]
    np.testing.assert_allclose(three.rates, [1 / 2, 1 / 4, 1 / 8, 1 / 8])


def test_mixture_rejects_misnumbered_leaves():
    clm = objectives.lookup("clm").builder(objectives.make_settings("clm"), VOCAB, 1)
    with pytest.raises(ValueError, match="objective_id"):
        objectives.Mixture(clm)


# ---------------------------------------------------------------------------------------
# Determinism


def draw(mixture, seed, count=30):
    chunk = TextChunk(TEXT, sentence_starts=[0, 8], other_document=np.arange(80, 100))
    return [mixture(chunk, np.random.default_rng([seed, index])) for index in range(count)]


@pytest.mark.parametrize("spec", ["mlm", "clm", "mass", "unilm", "mlm:1,clm:1,mass:1,unilm:1"])
def test_examples_are_a_function_of_the_generator_seed(spec):
    mixture = build_mixture(spec, VOCAB, {"mlm": {"nsp": True}} if "mlm" in spec else None)
    first, again, other = draw(mixture, 0), draw(mixture, 0), draw(mixture, 1)
    for a, b in zip(first, again):
        for name in objectives.TOKEN_FIELDS:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert a.extras.keys() == b.extras.keys() and all(np.array_equal(a.extras[k], b.extras[k]) for k in a.extras)
    same = [len(a) == len(b) and np.array_equal(a.inputs, b.inputs) for a, b in zip(first, other)]
    if spec == "clm":  # nothing random: every seed gives the same examples
        assert all(same)
    elif "," in spec:  # a mixture may pick CLM for both seeds at some index, not at all
        assert not all(same)
    else:  # another seed gives other masks in every example
        assert not any(same)


@pytest.mark.parametrize("name", ["mlm", "mass", "unilm"])
def test_a_different_seed_gives_a_different_mask(name):
    objective = leaf(name)
    chunk = TextChunk(TEXT, sentence_starts=[0, 8])
    a, b = objective(chunk, rng(0)), objective(chunk, rng(1))
    np.testing.assert_array_equal(a.targets[:20], b.targets[:20])
    assert not np.array_equal(a.inputs, b.inputs)
    if name != "mass":
        assert not np.array_equal(a.weights, b.weights)
    else:
        assert a.positions[20] != b.positions[20]  # another span start
