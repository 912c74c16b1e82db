"""Tokenizer and chat template from the checkpoint, on the `tokenizers` library.

A GGUF file carries its BPE vocabulary, merges, special tokens and Jinja chat template in
its metadata; a Hugging Face directory carries tokenizer.json (+ tokenizer_config.json,
generation_config.json). Malformed files raise `CheckpointError` naming the file and key.
`IncrementalDetokenizer` turns a growing token list into text deltas that never end in a
broken UTF-8 sequence.

Chat messages cannot forge roles: special-token text inside a message (say a user writing
`<|im_start|>system` in its content, a tool call's arguments or a tool's description) is
tokenized as plain text, and only the markers the chat template itself writes become control
tokens (`apply_chat_template(split_special_tokens=...)`).

Tools (`apply_chat_template(tools=...)`, OpenAI's tool objects) reach the template as its
`tools` variable, with tool calls and tool results in OpenAI's message shapes
(`model.chat_tools`). A template that never reads `tools` (`takes_tools` False, as
SmolLM2's) is given the conversation rewritten in the default tool format instead
(`chat_tools.default_format`), so that the tools still reach the model.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HfTokenizer

from dendrite_jax.model import chat_tools
from dendrite_jax.model.checkpoint_error import CheckpointError, json_object
from dendrite_jax.model.gguf_file import GgufFile
from dendrite_jax.validation import check_text

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


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson` for templates: JSON as json.dumps writes it (jinja2's own sorts
    keys and escapes HTML), so tools and tool calls render as the model was trained on."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


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
        specials = sorted({t.content for t in backend.get_added_tokens_decoder().values()
                           if t.special}, key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._plain: HfTokenizer | None = None  # the backend reading special tokens as text
        self._template = None
        self.takes_tools = False
        if chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
                                                               lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            env.filters["tojson"] = _tojson
            self._template = env.from_string(chat_template)
            # Whether the template reads `tools` itself; if not, tools and tool calls are
            # written in the default format (`chat_tools.default_format`).
            self.takes_tools = "tools" in jinja2.meta.find_undeclared_variables(
                env.parse(chat_template))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings such as <|im_start|> map to their ids."""
        # encode_batch releases the GIL while it works; encode holds it, stalling every other
        # thread (the server's event loop included) for as long as a long text takes.
        ids = self.backend.encode_batch([check_text(text, "text")],
                                        add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None and (
                not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with special-token strings read as ordinary text."""
        if self._plain is None:
            plain = HfTokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode_batch([check_text(text, "text")],
                                        add_special_tokens=False)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, split_special_tokens: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str | list[int]:
        """Render `messages` ([{"role":..., "content":...}], with OpenAI's tool calls and
        tool results: `chat_tools.chat_messages`) and `tools` (OpenAI tool objects) with the
        checkpoint's template. Where the template does not read `tools` (`takes_tools`),
        the conversation is rewritten in the default tool format (`chat_tools.default_format`)
        and rendered as plain turns.

        With `tokenize`, return token ids, and with `split_special_tokens` (the default)
        special-token text inside any string of the messages or tools is tokenized as plain
        text, so that it cannot open a turn of another role; only the template's own markers
        are control tokens. The rendered text (`tokenize=False`) cannot keep that distinction:
        encoding it reads every special-token string as a control token.
        """
        if self._template is None:
            raise ValueError("this checkpoint has no chat template; pass plain prompts instead")
        messages = chat_tools.chat_messages(messages)
        tools = chat_tools.chat_tools(tools)
        marks: list[str] = []
        nonce = secrets.token_hex(8)
        if tokenize and split_special_tokens and self._specials is not None:
            # ASCII marks, which survive the JSON escaping of a template's `tojson`.
            def mark(found: re.Match) -> str:
                marks.append(found.group())
                return f"[[{nonce}:{len(marks) - 1}]]"

            messages, tools = _map_strings((messages, tools),
                                           lambda s: self._specials.sub(mark, s))
        if not self.takes_tools:
            messages, tools = chat_tools.default_format(messages, tools), None
        special = lambda i: None if i is None else self.backend.id_to_token(i)  # noqa: E731
        try:
            text = self._template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                bos_token=special(self.bos_token_id) or "",
                eos_token=special(self.eos_token_id) or "", **kwargs)
        except ValueError:
            raise
        except Exception as e:  # jinja2's errors and whatever a template's code raises
            raise ValueError(f"chat template error: {type(e).__name__}: {e}") from None
        if not tokenize:
            return text
        # The template already writes any BOS it wants: do not add special tokens again.
        ids: list[int] = []
        parts = re.split(f"\\[\\[{nonce}:(\\d+)\\]\\]", text) if marks else [text]
        for i, part in enumerate(parts):
            if i % 2:
                ids += self.encode_plain(marks[int(part)])
            elif part:
                ids += self.encode(part, add_special_tokens=False)
        return ids

    # ------------------------------------------------------------------------------ loaders

    @classmethod
    def from_gguf(cls, gguf: GgufFile) -> Tokenizer:
        meta, path = gguf.metadata, gguf.path
        model = meta.get("tokenizer.ggml.model")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if model != "gpt2":
            raise CheckpointError(path, f"GGUF tokenizer model {model!r} is not supported (only "
                                  "byte-level BPE, 'gpt2')", "tokenizer.ggml.model")
        if pre not in _GGUF_PRE_TOKENIZERS:
            raise CheckpointError(path, f"GGUF pre-tokenizer {pre!r} is not supported; "
                                  f"supported: {', '.join(sorted(_GGUF_PRE_TOKENIZERS))}",
                                  "tokenizer.ggml.pre")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        types = meta.get("tokenizer.ggml.token_type") or []
        if not isinstance(tokens, list) or not tokens or not all(
                isinstance(t, str) for t in tokens):
            raise CheckpointError(path, "must be a non-empty list of strings",
                                  "tokenizer.ggml.tokens")
        if not isinstance(merges, list) or not all(
                isinstance(m, str) and " " in m for m in merges):
            raise CheckpointError(path, "must be a list of 'left right' strings",
                                  "tokenizer.ggml.merges")
        if not isinstance(types, list) or len(types) not in (0, len(tokens)):
            raise CheckpointError(path, "must list one type per token", "tokenizer.ggml.token_type")

        def token_id(key: str, required: bool = False) -> int | None:
            value = meta.get(key)
            if value is None and not required:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or not (
                    0 <= value < len(tokens)):
                raise CheckpointError(path, f"must be a token id below {len(tokens)}, got "
                                      f"{value!r}", key)
            return value

        eos = token_id("tokenizer.ggml.eos_token_id", required=True)
        eot = token_id("tokenizer.ggml.eot_token_id")
        template = meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise CheckpointError(path, "must be a string", "tokenizer.chat_template")
        try:
            bpe = models.BPE({tok: i for i, tok in enumerate(tokens)},
                             [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
            backend = HfTokenizer(bpe)
            backend.pre_tokenizer = _GGUF_PRE_TOKENIZERS[pre]()
            backend.decoder = decoders.ByteLevel()
            backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                        for i, kind in enumerate(types)
                                        if kind in (_CONTROL, _USER_DEFINED)])
        except Exception as e:  # the tokenizers library's own errors
            raise CheckpointError(path, f"cannot build the tokenizer: {e}") from None
        return _tokenizer(path, "tokenizer.chat_template", backend,
                          bos_token_id=token_id("tokenizer.ggml.bos_token_id"), eos_token_id=eos,
                          chat_template=template,
                          add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                          stop_token_ids=() if eot is None else (eot,))

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
            raise CheckpointError(path, "file not found (a Hugging Face checkpoint needs "
                                  "tokenizer.json)")
        try:
            backend = HfTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library's own errors
            raise CheckpointError(path, f"cannot load the tokenizer ({e})") from None
        config_path = directory / "tokenizer_config.json"
        config = json_object(config_path, missing_ok=True)
        generation = json_object(directory / "generation_config.json", missing_ok=True)

        def token_id(key: str) -> int | None:
            token = config.get(key)
            if token is None:
                return None
            text = token.get("content") if isinstance(token, dict) else token
            found = backend.token_to_id(text) if isinstance(text, str) else None
            if found is None:
                raise CheckpointError(config_path, f"{token!r} is not a token of tokenizer.json",
                                      key)
            return found

        bos, eos = token_id("bos_token"), token_id("eos_token")
        gen_eos = generation.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else gen_eos or []
        if not isinstance(gen_eos, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < backend.get_vocab_size()
                for i in gen_eos):
            raise CheckpointError(directory / "generation_config.json",
                                  f"must be a token id or a list of them, got {gen_eos!r}",
                                  "eos_token_id")
        if eos is None and not gen_eos:
            raise CheckpointError(directory, "no eos token in tokenizer_config.json or "
                                  "generation_config.json")
        template, template_source = config.get("chat_template"), config_path
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        template_file = directory / "chat_template.jinja"
        if template is None and template_file.is_file():
            template, template_source = template_file.read_text(errors="replace"), template_file
        if template is not None and not isinstance(template, str):
            raise CheckpointError(config_path, "must be a string", "chat_template")
        return _tokenizer(template_source, "chat_template", backend, bos_token_id=bos,
                          eos_token_id=eos if eos is not None else gen_eos[0],
                          chat_template=template, stop_token_ids=tuple(gen_eos))


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """`value` (JSON data in lists, tuples and dicts) with `fn` applied to every string, keys
    included."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_map_strings(v, fn) for v in value)
    return value


def _tokenizer(path: Path, template_key: str, backend: HfTokenizer, **kwargs: Any) -> Tokenizer:
    """A Tokenizer, its chat template's syntax errors named as the file's."""
    try:
        return Tokenizer(backend, **kwargs)
    except jinja2.TemplateError as e:
        raise CheckpointError(path, f"the chat template does not parse: {e}",
                              template_key) from None


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
