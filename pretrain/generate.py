"""Text from a trained model: left-to-right continuation, seq2seq, and [MASK] filling.

    python -m pretrain.generate --workdir=runs/clm --prompt="The list" --prompt="A module"
    python -m pretrain.generate --workdir=runs/unilm --mode=seq2seq --prompt="Return the sum." --top_p=0.9
    python -m pretrain.generate --workdir=runs/mlm --prompt="Return the [MASK] of two numbers."

Generation speaks each objective's own layout (its token types, delimiters and
attention kinds), so a model is asked the way it was trained:

| layout | mode     | prompt row                                         | each new token              |
|--------|----------|----------------------------------------------------|-----------------------------|
| clm    | continue | `[BOS] prompt`, L2R, type 0                         | next-token prediction       |
| unilm  | seq2seq  | `[SOS] source [EOS]` PREFIX type 4, then `[MASK]`   | predicted at a `[MASK]` slot (type 5, L2R), as UniLM decodes: its cloze loss predicts a position's own token |
| mass   | seq2seq  | `source [MASK]*k` PREFIX type 0, then the last source token, L2R type 1 | next-token prediction of the span at the end (k = max_new_tokens) |
| mlm    | fill     | `[CLS] text [SEP]`, all PREFIX                      | one pass; only `[MASK]` positions change |

L2R modes decode with the model's KV cache (`Transformer.init_cache` / `extend`):
the prompt is one prefill (rows of different lengths are right-padded with
segment 0, which no token sees), then one or two L2R tokens per step. Under the
attention rule a PREFIX source never sees the generated target. UniLM's [MASK]
slot of the previous step is hidden from later tokens by giving it segment 0 in
the cache. A row stops at [EOS] or after its max_new_tokens; only ordinary
tokens and [EOS] are ever generated (ordinary tokens only when filling).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from objectives import L2R, PREFIX, Vocabulary
from objectives.vocab import BOS_ID, CLS_ID, EOS_ID, MASK_ID, PAD_ID, SEP_ID
from pretrain import cli
from pretrain.model import DecodeCache, Transformer
from pretrain.tokenizer import Tokenizer

MASK_TEXT = "[MASK]"


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: temperature 0 is greedy (argmax); top_k > 0
    keeps the k most likely tokens; top_p < 1 keeps the smallest set whose
    probability reaches p (nucleus sampling)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0: off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1] (1: off)")


GREEDY = Sampling()


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """int32 [B] drawn from float logits [B, V] (banned tokens already at -inf)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
        last = jnp.maximum(jnp.sum(before < sampling.top_p, axis=-1, keepdims=True) - 1, 0)
        logits = jnp.where(logits < jnp.take_along_axis(ordered, last, axis=-1), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# -- prompts in each objective's layout ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One row's prefill and how its generation continues.

    Attributes:
      inputs, positions, attention_kind, token_types: int32 [n], the prefill.
      next_position: the position of the first generated token.
      target_type: the token type of generated tokens.
      cloze: whether each new token is predicted at a [MASK] slot at its own
        position (UniLM) rather than from the previous token (next-token).
      max_new_tokens: the most tokens this row generates.
    """

    inputs: np.ndarray
    positions: np.ndarray
    attention_kind: np.ndarray
    token_types: np.ndarray
    next_position: int
    target_type: int
    cloze: bool
    max_new_tokens: int

    def __len__(self) -> int:
        return len(self.inputs)


def _row(parts: Sequence[tuple[Sequence[int], int, int]], positions: Sequence[int] | None = None
         ) -> dict[str, np.ndarray]:
    """Concatenates (tokens, kind, type) parts; positions default to 0..n-1."""
    inputs = np.concatenate([np.asarray(tokens, np.int32) for tokens, _, _ in parts])
    kinds = np.concatenate([np.full(len(tokens), kind, np.int32) for tokens, kind, _ in parts])
    types = np.concatenate([np.full(len(tokens), kind_type, np.int32) for tokens, _, kind_type in parts])
    positions = np.arange(len(inputs), dtype=np.int32) if positions is None else np.asarray(positions, np.int32)
    return dict(inputs=inputs, positions=positions, attention_kind=kinds, token_types=types)


def clm_prompt(tokens: np.ndarray, max_new_tokens: int) -> Prompt:
    """`[BOS] tokens`, all L2R, type 0: causal LM continuation."""
    row = _row([([BOS_ID, *tokens], L2R, 0)])
    return Prompt(**row, next_position=len(tokens) + 1, target_type=0, cloze=False, max_new_tokens=max_new_tokens)


def unilm_prompt(tokens: np.ndarray, max_new_tokens: int) -> Prompt:
    """`[SOS] source [EOS]` (PREFIX, type 4) then a [MASK] (L2R, type 5): UniLM seq2seq."""
    row = _row([([BOS_ID, *tokens, EOS_ID], PREFIX, 4), ([MASK_ID], L2R, 5)])
    return Prompt(**row, next_position=len(tokens) + 2, target_type=5, cloze=True, max_new_tokens=max_new_tokens)


def mass_prompt(tokens: np.ndarray, max_new_tokens: int) -> Prompt:
    """MASS with the span at the end: encoder `source [MASK]*k` (PREFIX, type 0), decoder
    starting from the last source token at its position (L2R, type 1); k = max_new_tokens."""
    n, k = len(tokens), max_new_tokens
    if n == 0:
        raise ValueError("a MASS prompt needs at least one source token (the decoder starts from the last)")
    row = _row([([*tokens, *[MASK_ID] * k], PREFIX, 0), ([tokens[-1]], L2R, 1)],
               positions=[*range(n + k), n - 1])
    return Prompt(**row, next_position=n, target_type=1, cloze=False, max_new_tokens=k)


LAYOUTS: dict[str, Callable[[np.ndarray, int], Prompt]] = {
    "clm": clm_prompt, "unilm": unilm_prompt, "mass": mass_prompt}
FILL_DELIMITERS: dict[str, tuple[int, int]] = {"mlm": (CLS_ID, SEP_ID), "unilm": (BOS_ID, EOS_ID)}


def allowed_tokens(vocab: Vocabulary, *, eos: bool) -> np.ndarray:
    """bool [V]: the ordinary tokens, plus [EOS] when `eos`."""
    allowed = ~vocab.is_special(np.arange(vocab.size))
    allowed[EOS_ID] = eos
    return allowed


# -- decoding --------------------------------------------------------------------------


class _Decoder:
    """The jitted prefill / step and token choice of one model."""

    def __init__(self, model: Transformer, allowed: np.ndarray, sampling: Sampling):
        graphdef, self.state = nnx.split(model)
        banned = jnp.asarray(~allowed)

        @jax.jit
        def extend(state, cache: DecodeCache, tokens: dict, read: jax.Array, key: jax.Array):
            model = nnx.merge(graphdef, state)
            hidden, cache = model.extend(cache, tokens)
            logits = model.logits(jnp.take_along_axis(hidden, read[:, None, None], axis=1)[:, 0])
            return sample(jnp.where(banned, -jnp.inf, logits), key, sampling), cache

        self.extend = extend


def _padded(prompts: Sequence[Prompt], width: int) -> dict[str, np.ndarray]:
    """The prefill of every row, right-padded to `width` with segment 0."""
    batch = {name: np.zeros((len(prompts), width), np.int32)
             for name in ("inputs", "positions", "attention_kind", "token_types", "segment_ids")}
    for r, prompt in enumerate(prompts):
        for name in ("inputs", "positions", "attention_kind", "token_types"):
            batch[name][r, : len(prompt)] = getattr(prompt, name)
        batch["segment_ids"][r, : len(prompt)] = 1
    return batch


def generate(model: Transformer, prompts: Sequence[Prompt], *, sampling: Sampling = GREEDY, seed: int = 0,
             vocab: Vocabulary | None = None) -> list[np.ndarray]:
    """Generated token ids per prompt, with the KV cache; each ends at its first
    [EOS] (kept) or after its `max_new_tokens`. All prompts share one layout."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    if len({prompt.cloze for prompt in prompts}) != 1:
        raise ValueError("prompts of one batch must share a layout (all cloze or all next-token)")
    limit = model.config.max_positions
    for index, prompt in enumerate(prompts):
        if prompt.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={prompt.max_new_tokens} of prompt {index} must be >= 1")
        if prompt.next_position + prompt.max_new_tokens > limit:
            raise ValueError(f"prompt {index} ({len(prompt)} tokens in its layout) plus max_new_tokens="
                             f"{prompt.max_new_tokens} exceeds the model's max_positions={limit}; shorten the "
                             "prompt or lower max_new_tokens")
    vocab = vocab or Vocabulary(model.config.vocab_size)
    decoder = _Decoder(model, allowed_tokens(vocab, eos=True), sampling)
    cloze = prompts[0].cloze
    rows, width = len(prompts), max(len(prompt) for prompt in prompts)
    steps = max(prompt.max_new_tokens for prompt in prompts)
    per_step = 2 if cloze else 1  # cloze: the token just chosen, then a [MASK] for the next one
    lengths = np.asarray([len(prompt) for prompt in prompts])
    limits = np.asarray([prompt.max_new_tokens for prompt in prompts])
    next_positions = np.asarray([prompt.next_position for prompt in prompts])
    target_types = np.asarray([prompt.target_type for prompt in prompts], np.int32)

    key = jax.random.key(seed)
    cache = model.init_cache(rows, width + (steps - 1) * per_step)
    key, subkey = jax.random.split(key)
    chosen, cache = decoder.extend(decoder.state, cache, _padded(prompts, width), jnp.asarray(lengths - 1), subkey)
    mask_slots, filled = lengths - 1, width  # cloze: where each row's pending [MASK] sits
    out = np.full((rows, steps), PAD_ID, np.int32)
    count, done = np.zeros(rows, np.int64), np.zeros(rows, bool)
    for step in range(steps):
        chosen = np.asarray(chosen)
        active = ~done
        out[active, step] = chosen[active]
        count[active] += 1
        done |= active & ((chosen == EOS_ID) | (count >= limits))
        if done.all():
            break
        position = next_positions + step
        inputs = [chosen, np.full(rows, MASK_ID)] if cloze else [chosen]
        tokens = {
            "inputs": np.stack(inputs, axis=1).astype(np.int32),
            "positions": np.stack([position + j for j in range(per_step)], axis=1).astype(np.int32),
            "attention_kind": np.full((rows, per_step), L2R, np.int32),
            "token_types": np.repeat(target_types[:, None], per_step, axis=1),
            "segment_ids": np.repeat((~done).astype(np.int32)[:, None], per_step, axis=1),
        }
        if cloze:  # the chosen token replaces the pending [MASK]: hide that slot from now on
            cache = dataclasses.replace(cache, segment_ids=cache.segment_ids.at[np.arange(rows), mask_slots].set(0))
            mask_slots = np.full(rows, filled + 1)
        filled += per_step
        key, subkey = jax.random.split(key)
        chosen, cache = decoder.extend(decoder.state, cache, tokens, jnp.full((rows,), per_step - 1), subkey)
    return [out[r, : count[r]] for r in range(rows)]


def fill_masks(model: Transformer, texts: Sequence[np.ndarray], *, layout: str = "mlm",
               sampling: Sampling = GREEDY, seed: int = 0, vocab: Vocabulary | None = None) -> list[np.ndarray]:
    """Each token sequence with its [MASK] ids replaced by ordinary tokens, all other
    ids unchanged: one bidirectional pass over `open text close` (all PREFIX, type 0)."""
    if layout not in FILL_DELIMITERS:
        raise ValueError(f"fill layout {layout!r} is not one of {', '.join(FILL_DELIMITERS)}")
    if not texts:
        raise ValueError("no prompts to fill")
    for index, text in enumerate(texts):
        if not np.any(np.asarray(text) == MASK_ID):
            raise ValueError(f"prompt {index} has no {MASK_TEXT}; write {MASK_TEXT} where a token should be filled")
    first, last = FILL_DELIMITERS[layout]
    rows = [_row([([first, *text, last], PREFIX, 0)]) for text in texts]
    width = max(len(row["inputs"]) for row in rows)
    if width > model.config.max_positions:
        raise ValueError(f"a prompt of {width} tokens exceeds the model's max_positions={model.config.max_positions}")
    batch = {name: np.zeros((len(rows), width), np.int32) for name in (*rows[0], "segment_ids")}
    for r, row in enumerate(rows):
        for name, values in row.items():
            batch[name][r, : len(values)] = values
        batch["segment_ids"][r, : len(row["inputs"])] = 1
    vocab = vocab or Vocabulary(model.config.vocab_size)
    banned = jnp.asarray(~allowed_tokens(vocab, eos=False))
    logits = model.logits(model(batch, deterministic=True))
    logits = jnp.where(banned, -jnp.inf, logits).reshape(-1, logits.shape[-1])
    picks = np.asarray(sample(logits, jax.random.key(seed), sampling)).reshape(batch["inputs"].shape)
    filled = np.where(batch["inputs"] == MASK_ID, picks, batch["inputs"])
    return [filled[r, 1 : len(text) + 1] for r, text in enumerate(texts)]


def encode_with_masks(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` where each literal "[MASK]" becomes the [MASK] id (raw text
    never encodes to control symbols, so the pieces around it are encoded apart)."""
    pieces = text.split(MASK_TEXT)
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        if index:
            ids.append(MASK_ID)
        if piece.strip():
            ids.extend(tokenizer.encode(piece.strip()).tolist())
    return np.asarray(ids, np.int32)


# -- command line -----------------------------------------------------------------------

MODE_LAYOUTS: dict[str, tuple[str, ...]] = {
    "continue": ("clm",), "seq2seq": ("unilm", "mass"), "fill": ("mlm", "unilm")}


def resolve_mode(mode: str, layout: str, trained: Sequence[str], prompts: Sequence[str]) -> tuple[str, str]:
    """(mode, layout) from the flags ('auto' picks what the model was trained for)."""
    if mode == "auto":
        if any(MASK_TEXT in prompt for prompt in prompts):
            mode = "fill"
        elif "clm" in trained:
            mode = "continue"
        elif set(MODE_LAYOUTS["seq2seq"]) & set(trained):
            mode = "seq2seq"
        else:
            raise ValueError(f"a model trained with {'+'.join(trained)} fills masks: put {MASK_TEXT} in --prompt, "
                             "or choose --mode=continue or --mode=seq2seq")
    if mode not in MODE_LAYOUTS:
        raise ValueError(f"--mode={mode!r} is not one of auto, {', '.join(MODE_LAYOUTS)}")
    candidates = MODE_LAYOUTS[mode]
    if layout == "auto":
        layout = next((name for name in candidates if name in trained), candidates[0])
    if layout not in candidates:
        raise ValueError(f"--layout={layout!r} cannot do --mode={mode}; choose one of {', '.join(candidates)}")
    return mode, layout


FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "a training run's directory (pretrain.train --workdir)",
                               flag_values=FLAGS)
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "text to continue, translate or fill; repeat for a batch",
                                     flag_values=FLAGS)
_MODE = flags.DEFINE_enum("mode", "auto", ["auto", *MODE_LAYOUTS], "auto: fill when a prompt holds [MASK], else "
                          "continue (clm models) or seq2seq (unilm / mass models)", flag_values=FLAGS)
_LAYOUT = flags.DEFINE_enum("layout", "auto", ["auto", *LAYOUTS, *FILL_DELIMITERS],
                            "which objective's layout to use (auto: one the model was trained with)",
                            flag_values=FLAGS)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "tokens to generate at most (mass: exactly, the span)",
                                flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sample", flag_values=FLAGS)
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample from the k most likely tokens (0: off)", flag_values=FLAGS)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "sample from the nucleus of probability p (1: off)", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)


def run(workdir: str, prompts: Sequence[str], *, mode: str = "auto", layout: str = "auto",
        max_new_tokens: int = 32, sampling: Sampling = GREEDY, seed: int = 0) -> list[str]:
    """The command: one output line per prompt (checks the prompts before loading anything)."""
    if not prompts:
        raise ValueError("no --prompt given: pass --prompt='some text' (repeat it for a batch)")
    empty = [index for index, prompt in enumerate(prompts) if not prompt.strip()]
    if empty:
        raise ValueError(f"--prompt number {empty[0] + 1} is empty: give text to continue, translate or fill, "
                         "e.g. --prompt='Return the sum'")
    from pretrain.inference import load_trained  # checkpoints only once the flags make sense

    trained = load_trained(workdir)
    mode, layout = resolve_mode(mode, layout, trained.trained_objectives, prompts)
    tokenizer, vocab = trained.tokenizer, trained.tokenizer.vocabulary()
    if mode == "fill":
        texts = [encode_with_masks(tokenizer, prompt) for prompt in prompts]
        filled = fill_masks(trained.model, texts, layout=layout, sampling=sampling, seed=seed, vocab=vocab)
        return [f"{prompt!r} -> {tokenizer.decode(ids)!r}  (filled: "
                f"{', '.join(repr(tokenizer.piece(int(t))) for t in ids[text == MASK_ID])})"
                for prompt, text, ids in zip(prompts, texts, filled)]
    made = [LAYOUTS[layout](tokenizer.encode(prompt), max_new_tokens) for prompt in prompts]
    outputs = generate(trained.model, made, sampling=sampling, seed=seed, vocab=vocab)
    return [f"{prompt!r} -> {tokenizer.decode(ids)!r}" + ("  [EOS]" if len(ids) and ids[-1] == EOS_ID else "")
            for prompt, ids in zip(prompts, outputs)]


def command() -> str:
    """Generates for the parsed flags; returns the lines to print."""
    if not _WORKDIR.value:
        raise ValueError("--workdir is required: the directory of a training run, e.g. --workdir=runs/clm")
    sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    return "\n".join(run(_WORKDIR.value, _PROMPTS.value or [], mode=_MODE.value, layout=_LAYOUT.value,
                         max_new_tokens=_MAX_NEW.value, sampling=sampling, seed=_SEED.value))


def main(argv: Sequence[str] | None = None) -> None:
    cli.parse(FLAGS, sys.argv if argv is None else argv, __doc__)
    print(cli.run_reporting_bad_input(command))


if __name__ == "__main__":
    main()
