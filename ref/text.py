"""Raw text lines in, token ids out: the tokenizer a model carries in its `.intq`.

A model exported from text (`refsim export --tokenizer tokenizer.json`) stores the
`tokenizers` JSON file as a blob and, in `metadata["tokenizer"]`, how to use it:

    {"blob": "tokenizer.json", "max_length": 128, "padding": "max_length",
     "truncation": true, "pad_id": 0,
     "inputs": {"input_ids": "ids", "attention_mask": "attention_mask",
                "token_type_ids": "type_ids"}}

Every line is encoded with special tokens, truncated to `max_length` tokens and padded to
exactly `max_length` (the integer graph's sequence length is fixed), then each model input
named in `inputs` gets the encoding field it maps to, as a (1, max_length) array of the
input's declared type. Tokenization yields integers, so it belongs here with the engine;
nothing in it computes with floats.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .dtypes import check_fits
from .errors import InputError, RefsimError
from .inputs import Sample

ENCODING_FIELDS = ("ids", "attention_mask", "type_ids")
MAX_LENGTH = 1 << 20  # tokens per text: far beyond any model, small enough to allocate
DEFAULT_INPUTS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


class TextEncoder:
    """A `tokenizers` tokenizer with the padding and truncation a model was exported with."""

    def __init__(self, tokenizer_json: bytes | str, max_length: int, pad_id: int | None = None, truncation: bool = True):
        try:
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover - tokenizers is a declared dependency
            raise RefsimError("reading text needs the 'tokenizers' package") from None
        try:
            text = tokenizer_json.decode("utf-8") if isinstance(tokenizer_json, bytes) else tokenizer_json
            self.tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own exception type
            raise RefsimError(f"not a valid tokenizers JSON file: {str(e).splitlines()[0]}") from None
        if type(max_length) is not int or not 1 <= max_length <= MAX_LENGTH:
            raise RefsimError(f"max_length must be an integer from 1 to {MAX_LENGTH}, got {max_length!r}")
        if pad_id is not None and (type(pad_id) is not int or not 0 <= pad_id < 1 << 32):
            raise RefsimError(f"pad_id must be a token id (an integer from 0 to 2^32 - 1), got {pad_id!r}")
        self.max_length = max_length
        self.pad_id = self._pad_id() if pad_id is None else pad_id
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        if truncation:
            self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=self._pad_token())
        self.truncation = truncation

    def _pad_id(self) -> int:
        padding = self.tokenizer.padding
        if padding and padding.get("pad_id") is not None:
            return int(padding["pad_id"])
        for token in ("[PAD]", "<pad>", "<PAD>"):
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        return 0

    def _pad_token(self) -> str:
        return self.tokenizer.id_to_token(self.pad_id) or "[PAD]"

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """(len(texts), max_length) int64 arrays: ids, attention_mask, type_ids."""
        encodings = self.tokenizer.encode_batch(list(texts))
        out = {}
        for field in ENCODING_FIELDS:
            rows = [getattr(e, field) for e in encodings]
            if any(len(r) != self.max_length for r in rows):
                longest = max(len(r) for r in rows)
                raise InputError(f"a text encodes to {longest} tokens, more than max_length {self.max_length}")
            out[field] = np.array(rows, dtype=np.int64).reshape(len(texts), self.max_length)
        return out

    def settings(self) -> dict:
        return {"max_length": self.max_length, "padding": "max_length", "truncation": self.truncation, "pad_id": self.pad_id}


def encoder_for(model) -> tuple[TextEncoder, dict[str, str]]:
    """The model's embedded tokenizer and its input mapping."""
    meta = model.metadata.get("tokenizer")
    if not isinstance(meta, dict):
        raise InputError("the model has no embedded tokenizer; give inputs as numbers, .npy or .npz")
    blob = meta.get("blob", "tokenizer.json")
    if not isinstance(blob, str) or blob not in model.graph.blobs:
        raise InputError(f"the model's tokenizer blob {blob!r} is missing")
    if not isinstance(meta.get("truncation", True), bool):
        raise InputError(f"the model's tokenizer setting truncation must be true or false, got {meta['truncation']!r}")
    encoder = TextEncoder(model.graph.blobs[blob], meta.get("max_length", 0), meta.get("pad_id"), meta.get("truncation", True))
    mapping = meta.get("inputs") or {n: f for n, f in DEFAULT_INPUTS.items() if n in model.graph.inputs}
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise InputError(f"the model's tokenizer inputs must map input names to fields, got {mapping!r:.80}")
    for name, field in mapping.items():
        if field not in ENCODING_FIELDS:
            raise InputError(f"tokenizer input {name!r} maps to unknown field {field!r} (known: {', '.join(ENCODING_FIELDS)})")
    unknown = [n for n in mapping if n not in model.graph.inputs]
    if unknown:
        raise InputError(f"the model's tokenizer feeds {unknown}, which are not inputs of the model")
    missing = [n for n in model.graph.inputs if n not in mapping]
    if missing:
        raise InputError(f"model inputs {missing} do not come from the tokenizer; give inputs as .npz")
    return encoder, mapping


def text_reader_for(model):
    """A reader `(path, lines) -> samples` turning each non-empty line into token ids."""
    encoder, mapping = encoder_for(model)
    tensors = model.graph.tensors

    def read(path: str, lines: list[str]) -> Iterator[Sample]:
        texts = [(number, line.strip()) for number, line in enumerate(lines, 1)]
        texts = [(number, text) for number, text in texts if text and not text.startswith("#")]
        for start in range(0, len(texts), ENCODE_CHUNK):  # the tokenizer encodes a chunk at once
            chunk = texts[start:start + ENCODE_CHUNK]
            encoded = encoder.encode([text for _, text in chunk])
            for row, (number, text) in enumerate(chunk):
                feeds = {}
                for name, field in mapping.items():
                    t = tensors[name].dtype
                    ids = encoded[field][row:row + 1]
                    check_fits(ids, t, f"{path}:{number}: input {name!r}")  # no silent wrap of large ids
                    feeds[name] = ids.astype(t.storage)
                yield Sample(feeds, f"{path}:{number}", text)

    return read


ENCODE_CHUNK = 256  # lines per batched tokenizer call
