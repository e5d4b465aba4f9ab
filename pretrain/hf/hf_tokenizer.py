"""A run's SentencePiece tokenizer as a `tokenizers` tokenizer with the same ids.

`AutoTokenizer.from_pretrained(dir)` loads what `write_tokenizer` writes
(`tokenizer.json` plus `tokenizer_config.json`), and encoding text with it
(`add_special_tokens=False`) gives exactly `Tokenizer.encode`'s ids: the same unigram
pieces and scores, the same whitespace handling (SentencePiece's dummy prefix and `▁`
for spaces, nothing normalised) and the same byte fallback. Pieces text can never
produce in SentencePiece (control symbols, byte pieces) get a score no path takes, so
the Viterbi search never picks them from raw text. The special tokens are the
tokenizer's own, by name; with special tokens on, a BERT export wraps text as
`[CLS] text [SEP]` (pairs `[CLS] A [SEP] B [SEP]`, types 0/1) and a GPT-2 export as
`[BOS] text`, the layouts the run trained on.

Only unigram models are exported (this project's default); a BPE SentencePiece model is
refused with the fix.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from objectives.vocab import PARADIGM_TOKENS
from pretrain.tokenizer import WORD_BOUNDARY, Tokenizer

UNREACHABLE_SCORE = -1e9  # below any path through real pieces: never chosen from text
# (name in tokenizer_config.json, special token of objectives.vocab)
ROLES = (("pad_token", "[PAD]"), ("unk_token", "[UNK]"), ("bos_token", "[BOS]"), ("eos_token", "[EOS]"),
         ("cls_token", "[CLS]"), ("sep_token", "[SEP]"), ("mask_token", "[MASK]"))
TEMPLATES = ("bert", "gpt2")


def to_hf_tokenizer(tokenizer: Tokenizer, template: str) -> HFTokenizer:
    """The `tokenizers` form of `tokenizer`; `template` ('bert' or 'gpt2') sets what
    special tokens encoding adds."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    if tokenizer.model_type != "unigram":
        raise ValueError(f"{tokenizer.path}: this run's tokenizer is a SentencePiece {tokenizer.model_type} model; "
                         "export writes unigram models only (config.tokenizer.model_type='unigram', the default)")
    vocab, unk_id = [], None
    for index, (piece, score, kind) in enumerate(tokenizer.pieces()):
        if kind == "unknown":
            unk_id = index
        vocab.append((piece, score if kind == "normal" else UNREACHABLE_SCORE))
    hf = HFTokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=True))
    # SentencePiece's dummy prefix: one ▁ before every text, even one that starts with a space
    hf.normalizer = normalizers.Sequence([normalizers.Prepend(WORD_BOUNDARY), normalizers.Replace(" ", WORD_BOUNDARY)])
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_BOUNDARY, prepend_scheme="never", split=True)
    hf.decoder = decoders.Sequence([decoders.Replace(WORD_BOUNDARY, " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = special_tokens(tokenizer)
    hf.add_special_tokens(list(specials))
    name = {index: piece for piece, index in specials.items()}
    vocab_ids = tokenizer.vocabulary().tokens
    if template == "bert":
        cls, sep = vocab_ids["[CLS]"], vocab_ids["[SEP]"]
        hf.post_processor = processors.TemplateProcessing(
            single=f"{name[cls]}:0 $A:0 {name[sep]}:0", pair=f"{name[cls]}:0 $A:0 {name[sep]}:0 $B:1 {name[sep]}:1",
            special_tokens=[(name[cls], cls), (name[sep], sep)])
    else:
        bos = vocab_ids["[BOS]"]
        hf.post_processor = processors.TemplateProcessing(single=f"{name[bos]} $A", pair=f"{name[bos]} $A $B",
                                                          special_tokens=[(name[bos], bos)])
    return hf


def special_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """Every special token of the tokenizer (the named ones and other control symbols),
    piece -> id."""
    return {piece: index for index, (piece, _, kind) in enumerate(tokenizer.pieces()) if kind in ("control", "unknown")}


def write_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike, template: str, max_length: int) -> None:
    """`tokenizer.json` and `tokenizer_config.json` in `directory`, which
    `AutoTokenizer.from_pretrained` loads as a fast tokenizer."""
    hf = to_hf_tokenizer(tokenizer, template)
    directory = os.fspath(directory)
    hf.save(os.path.join(directory, "tokenizer.json"))
    vocab_ids = tokenizer.vocabulary().tokens
    pieces = [piece for piece, _, _ in tokenizer.pieces()]
    roles = {role: pieces[vocab_ids[name]] for role, name in ROLES}
    named = set(roles.values())
    extra = [piece for piece in special_tokens(tokenizer) if piece not in named]
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if template == "bert" else ["input_ids",
                                                                                          "attention_mask"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "model_input_names": inputs,
              "clean_up_tokenization_spaces": False, **roles, "additional_special_tokens": extra,
              "paradigm_tokens": [token for token in PARADIGM_TOKENS if token in vocab_ids]}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
