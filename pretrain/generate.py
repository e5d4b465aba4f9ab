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

from objectives import L2R, PREFIX, Vocabulary, parse_mixture_spec
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


# -- which mode and layout ---------------------------------------------------------------

MODE_LAYOUTS: dict[str, tuple[str, ...]] = {
    "continue": ("clm",), "seq2seq": ("unilm", "mass"), "fill": ("mlm", "unilm")}


def trained_modes(trained: Sequence[str]) -> list[str]:
    """The modes a model trained with the objectives `trained` was trained for."""
    return [mode for mode, layouts in MODE_LAYOUTS.items() if set(layouts) & set(trained)]


def resolve_mode(mode: str, layout: str, trained: Sequence[str], prompts: Sequence[str]
                 ) -> tuple[str, str, str | None]:
    """(mode, layout, warning) from the flags; 'auto' picks what the model was trained for.

    Asking for a mode or layout the model never trained in is refused with what
    it can do, unless the layout is given explicitly (`--layout=...`), which
    forces it with a warning: a model asked in a layout it never saw answers
    nonsense (a causal LM never saw [MASK]; a seq2seq layout is empty to it)."""
    names = "+".join(trained)
    can = trained_modes(trained)
    if mode == "auto":
        if any(MASK_TEXT in prompt for prompt in prompts):
            mode = "fill"
        elif "continue" in can:
            mode = "continue"
        elif "seq2seq" in can:
            mode = "seq2seq"
        else:
            raise ValueError(f"a model trained with {names} fills masks: put {MASK_TEXT} in --prompt, "
                             "or choose --mode=continue or --mode=seq2seq")
    if mode not in MODE_LAYOUTS:
        raise ValueError(f"--mode={mode!r} is not one of auto, {', '.join(MODE_LAYOUTS)}")
    candidates = MODE_LAYOUTS[mode]
    if layout == "auto":
        matching = [name for name in candidates if name in trained]
        if not matching:
            what = {"continue": "continue text (next-token prediction)", "fill": f"fill {MASK_TEXT}",
                    "seq2seq": "generate a target from a source"}[mode]
            instead = f"; it can {' or '.join('--mode=' + m for m in can)}" if can else ""
            raise ValueError(f"--mode={mode} needs a model trained with {' or '.join(candidates)}, but this run "
                             f"was trained with {names}, which never learnt to {what}{instead}. To force it "
                             f"anyway, name the layout: --layout={candidates[0]}")
        layout = matching[0]
    if layout not in candidates:
        raise ValueError(f"--layout={layout!r} cannot do --mode={mode}; choose one of {', '.join(candidates)}")
    warning = None
    if layout not in trained:
        warning = (f"warning: the model was trained with {names}, never in the {layout} layout; "
                   "expect text unrelated to the prompt")
    return mode, layout, warning


def decode_continuation(tokenizer: Tokenizer, context: np.ndarray, ids: np.ndarray) -> str:
    """The text `ids` add after `context`, with the space that joins them (decoding
    `ids` alone drops a leading word boundary)."""
    context = np.asarray(context, np.int32)
    ids = np.asarray([i for i in np.asarray(ids).tolist() if i != EOS_ID], np.int32)
    head = tokenizer.decode(context)
    whole = tokenizer.decode(np.concatenate([context, ids]))
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(ids)


def demonstrate(model: Transformer, tokenizer: Tokenizer, trained: Sequence[str], sentence: str,
                max_new_tokens: int = 12) -> str:
    """One line of what a model trained with `trained` now does with `sentence` (a
    held-out sentence), next to what the text really says: greedy continuation of
    its first half of words (or, for a seq2seq model, generation after it), else
    filling one masked piece in the middle."""
    vocab = tokenizer.vocabulary()
    words = sentence.split()
    can = trained_modes(trained)
    if ("continue" in can or "seq2seq" in can) and len(words) >= 4:
        mode = "continue" if "continue" in can else "seq2seq"
        _, layout, _ = resolve_mode(mode, "auto", trained, [sentence])
        head_text = " ".join(words[: len(words) // 2])
        head, truth = tokenizer.encode(head_text), tokenizer.encode(" ".join(words[len(words) // 2:]))
        made = generate(model, [LAYOUTS[layout](head, min(max_new_tokens, len(truth)))], vocab=vocab)[0]
        verb = "continues" if mode == "continue" else "generates after"
        return (f"{verb} {head_text!r} with {decode_continuation(tokenizer, head, made)!r} "
                f"(the held-out text: {decode_continuation(tokenizer, head, truth[:max_new_tokens])!r})")
    tokens = tokenizer.encode(sentence)
    if "fill" not in can or len(tokens) < 3:
        return f"(no demonstration: the sentence {sentence!r} is too short)"
    _, layout, _ = resolve_mode("fill", "auto", trained, [MASK_TEXT])
    lengths = [len(tokenizer.piece(int(t)).lstrip("\u2581")) for t in tokens]
    lengths[0] = -1  # a middle piece: the first has no left context
    position = int(np.argmax(lengths))
    masked = tokens.copy()
    masked[position] = MASK_ID
    filled = fill_masks(model, [masked], layout=layout, vocab=vocab)[0]
    shown = f"{tokenizer.decode(tokens[:position])} {MASK_TEXT} {tokenizer.decode(tokens[position + 1:])}".strip()
    return (f"fills {MASK_TEXT} in {shown!r} with {tokenizer.piece(int(filled[position]))!r} "
            f"(the held-out text has {tokenizer.piece(int(tokens[position]))!r})")


# -- command line -----------------------------------------------------------------------


def run(workdir: str, prompts: Sequence[str], *, mode: str = "auto", layout: str = "auto",
        max_new_tokens: int = 32, sampling: Sampling = GREEDY, seed: int = 0) -> list[str]:
    """The command: one output line per prompt. The prompts and the mode are checked
    against the run's config before its checkpoint is loaded."""
    from pretrain.inference import load_trained, read_run_config  # checkpoint readers only when run

    if not prompts:
        raise ValueError("no --prompt given: pass --prompt='some text' (repeat it for a batch)")
    empty = [index for index, prompt in enumerate(prompts) if not prompt.strip()]
    if empty:
        raise ValueError(f"--prompt number {empty[0] + 1} is empty: give text to continue, translate or fill, "
                         "e.g. --prompt='Return the sum'")
    trained_names = tuple(parse_mixture_spec(read_run_config(workdir).objective))
    mode, layout, warning = resolve_mode(mode, layout, trained_names, prompts)
    trained = load_trained(workdir)
    tokenizer, vocab = trained.tokenizer, trained.tokenizer.vocabulary()
    notes = [warning] if warning else []
    if mode == "fill":
        texts = [encode_with_masks(tokenizer, prompt) for prompt in prompts]
        filled = fill_masks(trained.model, texts, layout=layout, sampling=sampling, seed=seed, vocab=vocab)
        return notes + [f"{prompt!r} -> {tokenizer.decode(ids)!r}  (filled: "
                        f"{', '.join(repr(tokenizer.piece(int(t))) for t in ids[text == MASK_ID])})"
                        for prompt, text, ids in zip(prompts, texts, filled)]
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    made = [LAYOUTS[layout](tokens, max_new_tokens) for tokens in encoded]
    outputs = generate(trained.model, made, sampling=sampling, seed=seed, vocab=vocab)
    return notes + [f"{prompt!r} -> {decode_continuation(tokenizer, tokens, ids)!r}"
                    + ("  [EOS]" if len(ids) and ids[-1] == EOS_ID else "")
                    for prompt, tokens, ids in zip(prompts, encoded, outputs)]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pretrain.generate`: flags are defined here, not at import."""
    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()
    workdir = flags.DEFINE_string("workdir", None, "a training run's directory (pretrain.train --workdir)",
                                  flag_values=flag_values)
    prompts = flags.DEFINE_multi_string("prompt", None, "text to continue, translate or fill; repeat for a batch",
                                        flag_values=flag_values)
    mode = flags.DEFINE_enum("mode", "auto", ["auto", *MODE_LAYOUTS], "auto: fill when a prompt holds [MASK], "
                             "else continue (clm models) or seq2seq (unilm / mass models)", flag_values=flag_values)
    layout = flags.DEFINE_enum("layout", "auto", list(dict.fromkeys(["auto", *LAYOUTS, *FILL_DELIMITERS])),
                               "which objective's layout to use (auto: one the model was trained with; naming one "
                               "it was not trained with forces it, with a warning)", flag_values=flag_values)
    max_new = flags.DEFINE_integer("max_new_tokens", 32, "tokens to generate at most (mass: exactly, the span)",
                                   flag_values=flag_values)
    temperature = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sample", flag_values=flag_values)
    top_k = flags.DEFINE_integer("top_k", 0, "sample from the k most likely tokens (0: off)",
                                 flag_values=flag_values)
    top_p = flags.DEFINE_float("top_p", 1.0, "sample from the nucleus of probability p (1: off)",
                               flag_values=flag_values)
    seed = flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=flag_values)
    cli.parse(flag_values, argv, __doc__)

    def command() -> str:
        if not workdir.value:
            raise ValueError("--workdir is required: the directory of a training run, e.g. --workdir=runs/clm")
        sampling = Sampling(temperature.value, top_k.value, top_p.value)
        return "\n".join(run(workdir.value, prompts.value or [], mode=mode.value, layout=layout.value,
                             max_new_tokens=max_new.value, sampling=sampling, seed=seed.value))

    print(cli.run_reporting_bad_input(command))


if __name__ == "__main__":
    main()
