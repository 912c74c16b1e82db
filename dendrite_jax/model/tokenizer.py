"""Tokenizer and chat template from the checkpoint, on the `tokenizers` library.

A GGUF file carries its BPE vocabulary, merges, special tokens and Jinja chat template in
its metadata; a Hugging Face directory carries tokenizer.json (+ tokenizer_config.json,
generation_config.json). `IncrementalDetokenizer` turns a growing token list into text
deltas that never end in a broken UTF-8 sequence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HfTokenizer

from dendrite_jax.model.gguf_file import GgufFile

# GGUF `tokenizer.ggml.pre` -> pre-tokenizer. SmolLM splits digits one by one, then applies
# GPT-2's byte-level regex (as llama.cpp's "smollm" pre-type does).
_GGUF_PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are special tokens


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


class Tokenizer:
    """Encode/decode text and render the checkpoint's chat template."""

    def __init__(self, backend: HfTokenizer, *, bos_token_id: int | None, eos_token_id: int,
                 chat_template: str | None, add_bos_token: bool = False,
                 stop_token_ids: tuple[int, ...] = ()) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.stop_token_ids = tuple(dict.fromkeys((eos_token_id, *stop_token_ids)))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._template = None
        if chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
                                                               lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings such as <|im_start|> map to their ids."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None and (
                not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render `messages` ([{"role":..., "content":...}]) with the checkpoint's template."""
        if self._template is None:
            raise ValueError("this checkpoint has no chat template; pass plain prompts instead")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each chat message needs 'role' and 'content', got {m!r}")
        special = lambda i: None if i is None else self.backend.id_to_token(i)  # noqa: E731
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=special(self.bos_token_id) or "",
                                     eos_token=special(self.eos_token_id) or "", **kwargs)
        # The template already writes any BOS it wants: do not add special tokens again.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ------------------------------------------------------------------------------ loaders

    @classmethod
    def from_gguf(cls, gguf: GgufFile) -> Tokenizer:
        meta, path = gguf.metadata, gguf.path
        model = meta.get("tokenizer.ggml.model")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if model != "gpt2":
            raise ValueError(f"{path}: GGUF tokenizer model {model!r} is not supported (only "
                             "byte-level BPE, 'gpt2')")
        if pre not in _GGUF_PRE_TOKENIZERS:
            raise ValueError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported; supported: "
                             f"{', '.join(sorted(_GGUF_PRE_TOKENIZERS))}")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        types = meta.get("tokenizer.ggml.token_type")
        if not tokens or merges is None:
            raise ValueError(f"{path}: GGUF metadata lacks tokenizer tokens or merges")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        bpe = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
        backend = HfTokenizer(bpe)
        backend.pre_tokenizer = _GGUF_PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        specials = [AddedToken(tokens[i], special=True, normalized=False)
                    for i, kind in enumerate(types or []) if kind in (_CONTROL, _USER_DEFINED)]
        backend.add_special_tokens(specials)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        if eos is None:
            raise ValueError(f"{path}: GGUF metadata lacks tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        return cls(backend, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                   eos_token_id=int(eos), chat_template=meta.get("tokenizer.chat_template"),
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   stop_token_ids=() if eot is None else (int(eot),))

    def save_hf_dir(self, directory: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json, which
        `from_hf_dir` (and Hugging Face tokenizers) read back to the same tokenizer. Only for
        tokenizers that add no BOS themselves (`add_bos_token` False), as SmolLM2's."""
        if self.add_bos_token:
            raise ValueError("save_hf_dir does not write add_bos_token; this tokenizer adds BOS")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        token = lambda i: None if i is None else self.backend.id_to_token(i)  # noqa: E731
        config = {"bos_token": token(self.bos_token_id), "eos_token": token(self.eos_token_id),
                  "chat_template": self.chat_template}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        (directory / "generation_config.json").write_text(
            json.dumps({"eos_token_id": list(self.stop_token_ids)}))

    @classmethod
    def from_hf_dir(cls, directory: Path) -> Tokenizer:
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{path}: file not found (a Hugging Face checkpoint needs tokenizer.json)")
        try:
            backend = HfTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: cannot load tokenizer ({e})") from None
        config = _json_or_empty(directory / "tokenizer_config.json")
        generation = _json_or_empty(directory / "generation_config.json")
        token_id = lambda tok: None if tok is None else backend.token_to_id(  # noqa: E731
            tok["content"] if isinstance(tok, dict) else tok)
        bos = token_id(config.get("bos_token"))
        eos = token_id(config.get("eos_token"))
        gen_eos = generation.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if eos is None and not gen_eos:
            raise ValueError(f"{directory}: no eos token in tokenizer_config.json or "
                             "generation_config.json")
        template = config.get("chat_template")
        template_file = directory / "chat_template.jinja"
        if template is None and template_file.is_file():
            template = template_file.read_text()
        return cls(backend, bos_token_id=bos, eos_token_id=eos if eos is not None else gen_eos[0],
                   chat_template=template if isinstance(template, str) else None,
                   stop_token_ids=tuple(gen_eos))


def _json_or_empty(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


class IncrementalDetokenizer:
    """Text deltas for a growing token list.

    Decodes a small window of recent tokens and holds back text that ends in U+FFFD (an
    incomplete UTF-8 sequence split across byte-level tokens) until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a sequence: whatever was held back, replacement characters included."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]
