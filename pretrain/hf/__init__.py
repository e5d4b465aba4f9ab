"""Hugging Face interop: this project's runs as `transformers` checkpoints (export)
and `transformers` checkpoints as this project's models (import).

`convert` maps parameters both ways (NumPy only), `hf_tokenizer` writes a run's
SentencePiece model as a `tokenizers` tokenizer with the same ids, and
`pretrain.export` is the command.
"""
