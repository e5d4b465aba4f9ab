"""Text from a trained model: continuation, seq2seq, and [MASK] filling, in the layout
of an objective the model was trained with.

    python -m pretrain.generate --workdir=runs/clm --prompt="The list" --prompt="A module"
    python -m pretrain.generate --workdir=runs/unilm --mode=seq2seq --prompt="Return the sum." --top_p=0.9
    python -m pretrain.generate --workdir=runs/mlm --prompt="Return the [MASK] of two numbers."

Every objective owns its layout (`objectives.layout`): its leaves say which modes
they offer (continue, seq2seq, fill) and lay out the prompt row (token types,
delimiters, attention kinds, positions), so a model is asked the way it was
trained and this module names no objective. It decodes:

- left to right with the model's KV cache (`Transformer.init_cache` / `extend`):
  the prompt is one prefill (rows of different lengths are right-padded with
  segment 0, which no token sees), then one L2R token per step (two for a cloze
  layout such as UniLM's, where each new token is predicted at a [MASK] slot at
  its own position; the previous slot is hidden from later tokens by giving it
  segment 0 in the cache). Under the attention rule a PREFIX source never sees the
  generated target. A row stops at [EOS] or after its max_new_tokens;
- or, to fill [MASK]s, in one bidirectional pass over the layout's `fill_row`
  (only the [MASK] positions change), or by generating the spans of a sentinel
  layout and splicing them back (`splice`).

Only ordinary tokens and [EOS] are ever generated (ordinary tokens when filling);
a sentinel layout also generates its sentinels.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from objectives import L2R, Objective, Vocabulary, build_mixture, registered_names
from objectives.layout import MODES, Prompt
from pretrain import cli
from pretrain.model import DecodeCache, Transformer
from pretrain.tokenizer import MODEL_FILENAME, Tokenizer

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


def allowed_tokens(vocab: Vocabulary, *, eos: bool, sentinels: bool = False) -> np.ndarray:
    """bool [V]: the ordinary tokens, plus [EOS] when `eos` and the sentinels when `sentinels`."""
    allowed = ~vocab.is_special(np.arange(vocab.size))
    allowed[vocab.eos] = eos
    allowed[list(vocab.sentinels)] = sentinels
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
             vocab: Vocabulary | None = None, sentinels: bool = False) -> list[np.ndarray]:
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
    decoder = _Decoder(model, allowed_tokens(vocab, eos=True, sentinels=sentinels), sampling)
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
    out = np.full((rows, steps), vocab.pad, np.int32)
    count, done = np.zeros(rows, np.int64), np.zeros(rows, bool)
    for step in range(steps):
        chosen = np.asarray(chosen)
        active = ~done
        out[active, step] = chosen[active]
        count[active] += 1
        done |= active & ((chosen == vocab.eos) | (count >= limits))
        if done.all():
            break
        position = next_positions + step
        inputs = [chosen, np.full(rows, vocab.mask)] if cloze else [chosen]
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


def fill_masks(model: Transformer, texts: Sequence[np.ndarray], leaf: Objective, *, sampling: Sampling = GREEDY,
               seed: int = 0) -> list[np.ndarray]:
    """Each token sequence with its [MASK] ids replaced by ordinary tokens, all other
    ids unchanged: one bidirectional pass over the leaf's `fill_row` of it."""
    vocab = leaf.vocab
    if not texts:
        raise ValueError("no prompts to fill")
    for index, text in enumerate(texts):
        if not np.any(np.asarray(text) == vocab.mask):
            raise ValueError(f"prompt {index} has no {MASK_TEXT}; write {MASK_TEXT} where a token should be filled")
    rows = [leaf.fill_row(np.asarray(text, np.int32)) for text in texts]
    if rows[0] is None:
        raise ValueError(f"objective {leaf.name!r} does not fill in one pass")
    width = max(len(row["inputs"]) for row in rows)
    if width > model.config.max_positions:
        raise ValueError(f"a prompt of {width} tokens exceeds the model's max_positions={model.config.max_positions}")
    batch = {name: np.zeros((len(rows), width), np.int32) for name in (*rows[0], "segment_ids")}
    for r, row in enumerate(rows):
        for name, values in row.items():
            batch[name][r, : len(values)] = values
        batch["segment_ids"][r, : len(row["inputs"])] = 1
    banned = jnp.asarray(~allowed_tokens(vocab, eos=False))
    logits = model.logits(model(batch, deterministic=True))
    logits = jnp.where(banned, -jnp.inf, logits).reshape(-1, logits.shape[-1])
    picks = np.asarray(sample(logits, jax.random.key(seed), sampling)).reshape(batch["inputs"].shape)
    out = []
    for r, text in enumerate(texts):
        text = np.asarray(text, np.int32)
        where = np.flatnonzero(rows[r]["inputs"] == vocab.mask)  # the [MASK]s of the text, in the row
        filled = text.copy()
        filled[text == vocab.mask] = picks[r, where]
        out.append(filled)
    return out


def fill_by_generating(model: Transformer, texts: Sequence[np.ndarray], leaf: Objective, *,
                       sampling: Sampling = GREEDY, seed: int = 0, max_new_tokens: int = 32) -> list[np.ndarray]:
    """Each token sequence with its [MASK]s replaced by spans the model generates in the
    leaf's sentinel layout (`prompt('fill', ...)`, then `splice`)."""
    prompts = [leaf.prompt("fill", np.asarray(text, np.int32), max_new_tokens) for text in texts]
    generated = generate(model, prompts, sampling=sampling, seed=seed, vocab=leaf.vocab, sentinels=True)
    return [leaf.splice(np.asarray(text, np.int32), made) for text, made in zip(texts, generated)]


def encode_with_masks(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` where each literal "[MASK]" becomes the [MASK] id (raw text
    never encodes to control symbols, so the pieces around it are encoded apart)."""
    pieces = text.split(MASK_TEXT)
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        if index:
            ids.append(tokenizer.vocabulary().mask)
        if piece.strip():
            ids.extend(tokenizer.encode(piece.strip()).tolist())
    return np.asarray(ids, np.int32)


# -- which mode and layout ---------------------------------------------------------------


def trained_modes(leaves: Sequence[Objective]) -> list[str]:
    """The generation modes the leaves of a run's objectives offer, in MODES order."""
    offered = {mode for leaf in leaves for mode in leaf.generation_modes()}
    return [mode for mode in MODES if mode in offered]


def offering(leaves: Sequence[Objective], mode: str, layout: str = "auto") -> list[Objective]:
    """The leaves that offer `mode`, narrowed to `layout` (a leaf name such as
    'unilm/seq2seq', or a registered objective's name such as 'unilm') unless 'auto'."""
    chosen = [leaf for leaf in leaves if mode in leaf.generation_modes()]
    if layout != "auto":
        chosen = [leaf for leaf in chosen if leaf.name == layout or leaf.name.startswith(layout + "/")]
    return chosen


def resolve_mode(mode: str, layout: str, trained: Sequence[Objective], prompts: Sequence[str],
                 vocab: Vocabulary | None = None) -> tuple[str, Objective, str | None]:
    """(mode, the leaf whose layout to use, warning) from the flags; 'auto' picks what the
    model was trained for (`trained`: the leaves of its objectives).

    Asking for a mode the model never trained in is refused with what it can do,
    unless the layout is given explicitly (`--layout=<objective>`), which forces
    that objective's layout with a warning: a model asked in a layout it never saw
    answers nonsense (a causal LM never saw [MASK]; a seq2seq layout is empty to it)."""
    names = "+".join(dict.fromkeys(leaf.name.split("/")[0] for leaf in trained))
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
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r} is not one of auto, {', '.join(MODES)}")
    matching = offering(trained, mode, layout)
    if matching:
        return mode, matching[0], None
    others = offering(_every_leaf(vocab or trained[0].vocab), mode)
    if layout != "auto":
        forced = offering(_every_leaf(vocab or trained[0].vocab), mode, layout)
        if not forced:
            raise ValueError(f"--layout={layout!r} cannot do --mode={mode}; choose one of "
                             f"{', '.join(sorted({leaf.name for leaf in others}))}")
        return mode, forced[0], (f"warning: the model was trained with {names}, never in the {forced[0].name} layout; "
                                 "expect text unrelated to the prompt")
    what = {"continue": "continue text (next-token prediction)", "fill": f"fill {MASK_TEXT}",
            "seq2seq": "generate a target from a source"}[mode]
    instead = f"; it can {' or '.join('--mode=' + m for m in can)}" if can else ""
    layouts = sorted(dict.fromkeys(leaf.name.split("/")[0] for leaf in others))
    either = ", ".join(layouts[:-1]) + " or " + layouts[-1] if len(layouts) > 1 else layouts[0]
    raise ValueError(f"--mode={mode} needs a model trained with {either}, but this run was trained "
                     f"with {names}, which never learnt to {what}{instead}. To force it anyway, name the layout: "
                     f"--layout={others[0].name}")


def _every_leaf(vocab: Vocabulary) -> list[Objective]:
    """A leaf of every registered objective (default settings) that this vocabulary can
    build, for naming layouts a model was not trained in."""
    leaves = []
    for name in registered_names():
        try:
            leaves.extend(build_mixture(name, vocab).objectives)
        except ValueError:
            continue  # e.g. a sentinel objective with a vocabulary without sentinels
    return leaves


def decode_continuation(tokenizer: Tokenizer, context: np.ndarray, ids: np.ndarray) -> str:
    """The text `ids` add after `context`, with the space that joins them (decoding
    `ids` alone drops a leading word boundary)."""
    context = np.asarray(context, np.int32)
    eos = tokenizer.vocabulary().eos
    ids = np.asarray([i for i in np.asarray(ids).tolist() if i != eos], np.int32)
    head = tokenizer.decode(context)
    whole = tokenizer.decode(np.concatenate([context, ids]))
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(ids)


def fill(model: Transformer, texts: Sequence[np.ndarray], leaf: Objective, *, sampling: Sampling = GREEDY,
         seed: int = 0, max_new_tokens: int = 32) -> list[np.ndarray]:
    """[MASK]s filled in the leaf's layout: one pass, or generated spans spliced back."""
    if leaf.fill_row(np.asarray(texts[0], np.int32)) is not None:
        return fill_masks(model, texts, leaf, sampling=sampling, seed=seed)
    return fill_by_generating(model, texts, leaf, sampling=sampling, seed=seed, max_new_tokens=max_new_tokens)


def demonstrate(model: Transformer, tokenizer: Tokenizer, trained: Sequence[Objective], sentence: str,
                max_new_tokens: int = 12) -> str:
    """One line of what a model trained with the leaves `trained` now does with
    `sentence` (a held-out sentence), next to what the text really says: greedy
    continuation of its first half of words (or, for a seq2seq model, generation
    after it), else filling one masked piece in the middle."""
    vocab = tokenizer.vocabulary()
    words = sentence.split()
    can = trained_modes(trained)
    if ("continue" in can or "seq2seq" in can) and len(words) >= 4:
        mode = "continue" if "continue" in can else "seq2seq"
        leaf = offering(trained, mode)[0]
        head_text = " ".join(words[: len(words) // 2])
        head, truth = tokenizer.encode(head_text), tokenizer.encode(" ".join(words[len(words) // 2:]))
        made = generate(model, [leaf.prompt(mode, head, min(max_new_tokens, len(truth)))], vocab=vocab)[0]
        verb = "continues" if mode == "continue" else "generates after"
        return (f"{verb} {head_text!r} with {decode_continuation(tokenizer, head, made)!r} "
                f"(the held-out text: {decode_continuation(tokenizer, head, truth[:max_new_tokens])!r})")
    tokens = tokenizer.encode(sentence)
    if "fill" not in can or len(tokens) < 3:
        return f"(no demonstration: the sentence {sentence!r} is too short)"
    leaf = offering(trained, "fill")[0]
    lengths = [len(tokenizer.piece(int(t)).lstrip("\u2581")) for t in tokens]
    lengths[0] = -1  # a middle piece: the first has no left context
    position = int(np.argmax(lengths))
    masked = tokens.copy()
    masked[position] = vocab.mask
    filled = fill(model, [masked], leaf)[0]
    shown = f"{tokenizer.decode(tokens[:position])} {MASK_TEXT} {tokenizer.decode(tokens[position + 1:])}".strip()
    return (f"fills {MASK_TEXT} in {shown!r} with {tokenizer.decode(filled[position : position + 1]) or '?'!r} "
            f"(the held-out text has {tokenizer.piece(int(tokens[position]))!r})")


def trained_leaves(config: Any, vocab: Vocabulary) -> list[Objective]:
    """The leaves of a run's objectives with the run's settings (its config.json)."""
    return list(build_mixture(config.objective, vocab, config.objectives).objectives)


# -- command line -----------------------------------------------------------------------


def run(workdir: str, prompts: Sequence[str], *, mode: str = "auto", layout: str = "auto",
        max_new_tokens: int = 32, sampling: Sampling = GREEDY, seed: int = 0) -> list[str]:
    """The command: one output line per prompt. The prompts and the mode are checked
    against the run's config and tokenizer before its checkpoint is loaded."""
    from pretrain.inference import (  # when run
        checkpoint_steps,
        load_trained,
        read_run_config,
        run_tokenizer,
    )

    if not prompts:
        raise ValueError("no --prompt given: pass --prompt='some text' (repeat it for a batch)")
    empty = [index for index, prompt in enumerate(prompts) if not prompt.strip()]
    if empty:
        raise ValueError(f"--prompt number {empty[0] + 1} is empty: give text to continue, translate or fill, "
                         "e.g. --prompt='Return the sum'")
    config = read_run_config(workdir)
    if not os.path.isfile(os.path.join(workdir, MODEL_FILENAME)):
        checkpoint_steps(workdir)  # a run without a checkpoint yet is the likelier news
    tokenizer = run_tokenizer(workdir)
    vocab = tokenizer.vocabulary()
    mode, leaf, warning = resolve_mode(mode, layout, trained_leaves(config, vocab), prompts, vocab)
    trained = load_trained(workdir)
    notes = [warning] if warning else []
    if mode == "fill":
        texts = [encode_with_masks(tokenizer, prompt) for prompt in prompts]
        filled = fill(trained.model, texts, leaf, sampling=sampling, seed=seed, max_new_tokens=max_new_tokens)
        return notes + [f"{prompt!r} -> {tokenizer.decode(ids)!r}  (filled: "
                        f"{', '.join(repr(tokenizer.decode(ids[i : i + 1])) for i in np.flatnonzero(text == vocab.mask))})"
                        if len(ids) == len(text) else f"{prompt!r} -> {tokenizer.decode(ids)!r}"
                        for prompt, text, ids in zip(prompts, texts, filled)]
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    made = [leaf.prompt(mode, tokens, max_new_tokens) for tokens in encoded]
    outputs = generate(trained.model, made, sampling=sampling, seed=seed, vocab=vocab)
    return notes + [f"{prompt!r} -> {decode_continuation(tokenizer, tokens, ids)!r}"
                    + ("  [EOS]" if len(ids) and ids[-1] == vocab.eos else "")
                    for prompt, tokens, ids in zip(prompts, encoded, outputs)]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pretrain.generate`: flags are defined here, not at import."""
    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()
    workdir = flags.DEFINE_string("workdir", None, "a training run's directory (pretrain.train --workdir)",
                                  flag_values=flag_values)
    prompts = flags.DEFINE_multi_string("prompt", None, "text to continue, translate or fill; repeat for a batch",
                                        flag_values=flag_values)
    mode = flags.DEFINE_enum("mode", "auto", ["auto", *MODES], "auto: fill when a prompt holds [MASK], else "
                             "continue or seq2seq, whichever the run's objectives offer", flag_values=flag_values)
    layout = flags.DEFINE_string("layout", "auto", "whose layout to use: an objective or leaf name (e.g. unilm, "
                                 "unilm/seq2seq, mass); auto: one the model was trained with; naming one it was not "
                                 "trained with forces it, with a warning", flag_values=flag_values)
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
