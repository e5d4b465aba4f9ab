"""Literal mask matrices for the attention rule, packed and per objective."""

import jax.numpy as jnp
import numpy as np
import pytest

import objectives
from objectives.example import ENCODER_ONLY, L2R, PREFIX, R2L, TextChunk
from pretrain.attention import attention_mask, visibility
from pretrain.packing import pack

P, L, R, E = int(PREFIX), int(L2R), int(R2L), int(ENCODER_ONLY)
VOCAB = objectives.Vocabulary(size=64)


def mask_of(segment_ids, kinds) -> np.ndarray:
    segment_ids = jnp.asarray([segment_ids], jnp.int32)
    kinds = jnp.asarray([kinds], jnp.int32)
    mask = attention_mask(segment_ids, kinds)
    assert mask.shape == (1, 1, segment_ids.shape[1], segment_ids.shape[1])
    return np.asarray(mask[0, 0]).astype(int)


def test_design_worked_packed_example():
    # DESIGN.md section 3: seq2seq (3 source + 2 target) | causal (3) | pad.
    got = mask_of([1, 1, 1, 1, 1, 2, 2, 2, 0], [P, P, P, L, L, L, L, L, P])
    np.testing.assert_array_equal(got, [
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
    ])


def test_right_to_left_example():
    np.testing.assert_array_equal(mask_of([1, 1, 1], [R, R, R]), [
        [1, 1, 1],
        [0, 1, 1],
        [0, 0, 1],
    ])


def test_padding_kind_does_not_matter():
    # A pad token sees nothing and is seen by nobody, whatever kind it carries.
    for pad_kind in (P, L, R):
        got = mask_of([1, 1, 0], [L, L, pad_kind])
        np.testing.assert_array_equal(got, [[1, 0, 0], [1, 1, 0], [0, 0, 0]])


def test_prefix_never_sees_left_to_right_or_right_to_left():
    # A mixed-kind example (not produced by any built-in objective, but legal):
    # PREFIX tokens see only PREFIX tokens; R2L sees PREFIX and later R2L; L2R sees
    # PREFIX and earlier L2R; L2R and R2L never see each other.
    got = mask_of([1, 1, 1, 1, 1], [P, L, L, R, R])
    np.testing.assert_array_equal(got, [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 0, 1, 1],
        [1, 0, 0, 0, 1],
    ])


def test_encoder_only_tokens_are_hidden_from_the_decoder_parts():
    # A MASS-like example: source P E E P (two hidden [MASK]ed positions), decoder L L,
    # and an R2L token: source tokens see all the source; L2R and R2L never see E.
    got = mask_of([1, 1, 1, 1, 1, 1, 1], [P, E, E, P, L, L, R])
    np.testing.assert_array_equal(got, [
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 1, 0],
        [1, 0, 0, 1, 0, 0, 1],
    ])


def test_visibility_with_offset_query_slots_matches_full_mask():
    # Incremental decoding asks for rows of the full mask with the query slot given.
    segments = jnp.asarray([[1, 1, 1, 1, 2, 2]])
    kinds = jnp.asarray([[P, P, L, L, L, L]])
    full = np.asarray(attention_mask(segments, kinds)[0, 0])
    for slot in range(6):
        row = visibility(segments[:, slot:slot + 1], kinds[:, slot:slot + 1], jnp.asarray([slot]),
                         segments, kinds, jnp.arange(6))
        np.testing.assert_array_equal(np.asarray(row[0, 0]), full[slot])


def objective_mask(name: str, text_length: int, settings=None) -> np.ndarray:
    mixture = objectives.build_mixture(name, VOCAB, settings)
    chunk = TextChunk(np.arange(10, 10 + text_length), sentence_starts=[0, 2])
    examples = {leaf.name: leaf(chunk, np.random.default_rng(0)) for leaf in mixture.objectives}
    return {leaf: mask_of(np.ones(len(ex), int), ex.attention_kind) for leaf, ex in examples.items()}


def test_mlm_mask_is_all_ones():
    # [CLS] a b [SEP]: bidirectional.
    np.testing.assert_array_equal(objective_mask("mlm", 2)["mlm"], np.ones((4, 4), int))


def test_clm_mask_is_lower_triangular():
    # [BOS] a b c -> targets a b c [EOS]
    np.testing.assert_array_equal(objective_mask("clm", 3)["clm"], [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ])


def test_mass_mask_encoder_bidirectional_decoder_causal():
    # 4 text tokens -> k = 2 at u = 1 (this seed): encoder a [MASK] [MASK] d, the two
    # [MASK]s ENCODER_ONLY, then the decoder (2 L2R), which never sees them.
    settings = {"mass": {"mask_token_rate": 1.0, "random_token_rate": 0.0}}
    np.testing.assert_array_equal(objective_mask("mass", 4, settings)["mass"], [
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 1, 1, 1],
    ])
    # decoder_sees_masked_source: the whole encoder is PREFIX, as before MASS's enc_mask.
    settings["mass"]["decoder_sees_masked_source"] = True
    np.testing.assert_array_equal(objective_mask("mass", 4, settings)["mass"], [
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ])


def test_unilm_mode_masks():
    masks = objective_mask("unilm", 3)
    # Pair modes: [SOS] a b [EOS] | c [EOS] (split at the sentence start 2).
    np.testing.assert_array_equal(masks["unilm/bidirectional"], np.ones((6, 6), int))
    np.testing.assert_array_equal(masks["unilm/seq2seq"], [
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ])
    # Single-segment modes: [SOS] a b c [EOS].
    np.testing.assert_array_equal(masks["unilm/left_to_right"], np.tril(np.ones((5, 5), int)))
    np.testing.assert_array_equal(masks["unilm/right_to_left"], np.triu(np.ones((5, 5), int)))


def test_packed_row_of_mixed_objectives():
    # CLM (2 text tokens -> 3), MASS (2 text tokens -> 3), R2L UniLM (1 text token -> 3), pad 1.
    mixture = objectives.build_mixture("clm:1,mass:1,unilm:1", VOCAB)
    by_name = {leaf.name: leaf for leaf in mixture.objectives}
    rng = np.random.default_rng(0)
    examples = [
        by_name["clm"](TextChunk([10, 11]), rng),
        by_name["mass"](TextChunk([12, 13]), rng),
        by_name["unilm/right_to_left"](TextChunk([14]), rng),
    ]
    row = pack(examples, 10, strategy="first_fit")
    np.testing.assert_array_equal(row["segment_ids"][0], [1, 1, 1, 2, 2, 2, 3, 3, 3, 0])
    got = np.asarray(attention_mask(jnp.asarray(row["segment_ids"]),
                                    jnp.asarray(row["attention_kind"]))[0, 0]).astype(int)
    np.testing.assert_array_equal(got, [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 1, 0, 0, 0, 0],  # MASS's [MASK]ed source token is hidden from its decoder
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ])


@pytest.mark.parametrize("strategy", ["first_fit", "best_fit"])
def test_packing_keeps_every_token_and_restarts_positions(strategy):
    mixture = objectives.build_mixture("clm", VOCAB)
    lengths = [5, 3, 7, 2, 6, 1]
    examples = [mixture(TextChunk(np.arange(10, 10 + n)), np.random.default_rng(n)) for n in lengths]
    packed = pack(examples, 9, strategy=strategy)
    assert packed["inputs"].shape[1] == 9
    total = sum(len(e) for e in examples)
    assert int((packed["segment_ids"] > 0).sum()) == total
    for row in range(packed["inputs"].shape[0]):
        segments = packed["segment_ids"][row]
        for segment in set(segments.tolist()) - {0}:
            where = segments == segment
            np.testing.assert_array_equal(packed["positions"][row][where], np.arange(where.sum()))
            assert where.nonzero()[0].tolist() == list(range(where.argmax(), where.argmax() + where.sum()))
        assert np.all(packed["weights"][row][segments == 0] == 0)


def test_best_fit_packs_tighter_than_first_fit():
    # CLM examples of 5, 7, 3, 5 tokens into rows of 10. First fit puts the 3 into
    # row 0 (room 5), leaving no row for the last 5; best fit puts the 3 where it
    # fits most tightly (row 1, room 3), so the last 5 fills row 0.
    mixture = objectives.build_mixture("clm", VOCAB)
    examples = [mixture(TextChunk(np.arange(10, 10 + n - 1)), np.random.default_rng(0))
                for n in (5, 7, 3, 5)]
    np.testing.assert_array_equal(pack(examples, 10, strategy="first_fit")["segment_ids"], [
        [1, 1, 1, 1, 1, 2, 2, 2, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    ])
    np.testing.assert_array_equal(pack(examples, 10, strategy="best_fit")["segment_ids"], [
        [1, 1, 1, 1, 1, 2, 2, 2, 2, 2],
        [1, 1, 1, 1, 1, 1, 1, 2, 2, 2],
    ])


def test_packing_rejects_an_example_longer_than_a_row():
    example = objectives.build_mixture("clm", VOCAB)(TextChunk(np.arange(10, 20)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="more than seq_len=5"):
        pack([example], 5)
