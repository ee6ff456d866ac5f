"""The checkpoint's tokenizer at run time without transformers: ``tokenizers`` for the ids, ``jinja2`` for the chat
template, rendered as transformers does (same sandbox options, filters and globals, special tokens as variables).

transformers' fast tokenizers run ``tokenizer.json`` as is (its post-processor adds BOS/EOS); decoding only adds the
``clean_up_tokenization_spaces`` rule, which transformers skips for BPE models. :class:`StreamDecoder` turns token
ids into text pieces as they come, holding back a piece while it ends in an incomplete UTF-8 character (byte-level
BPE pieces, SentencePiece ``<0xNN>`` byte-fallback tokens), so a multi-byte character is never split.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

#: transformers' special-token attributes, passed to the chat template as variables.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable, or a chat template cannot be rendered."""


def read_json(path: Path) -> dict:
    """A JSON file as a dict ({} when absent), one clear error when it is not JSON."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); the export is corrupt: re-run vlm-export") from None


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def find_chat_template(root: Path) -> str | None:
    """The chat template transformers would use for this directory: ``chat_template.jinja``, then the legacy
    ``chat_template.json``, then ``processor_config.json`` / ``tokenizer_config.json`` entries (named templates:
    ``default``)."""
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = read_json(root / name).get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            template = {t.get("name"): t.get("template") for t in template}
        if isinstance(template, dict):
            template = template.get("default")
        if isinstance(template, str):
            return template
    return None


def compile_chat_template(template: str):
    """``template`` compiled in the environment transformers' ``_compile_jinja_template`` builds."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the export's chat template does not parse ({e}); re-export from a checkpoint with a "
                             "valid chat template") from None


@dataclass
class TextTokenizer:
    """``tokenizer.json`` plus what tokenizer_config.json adds: special tokens, chat template, decode cleanup."""

    tokenizer: "tokenizers.Tokenizer"  # noqa: F821
    special_tokens: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None
    clean_up_tokenization_spaces: bool = False

    @classmethod
    def from_dir(cls, root: str | Path) -> "TextTokenizer":
        from tokenizers import Tokenizer

        root = Path(root)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{root} has no tokenizer.json; re-run vlm-export (it copies the checkpoint's "
                                 "tokenizer into the export)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure: corrupt file
            raise TokenizerError(f"{path} is not a tokenizers file ({e}); re-run vlm-export") from None
        config = {**read_json(root / "special_tokens_map.json"), **read_json(root / "tokenizer_config.json")}
        special = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        cleanup = bool(config.get("clean_up_tokenization_spaces", False))
        if cleanup and type(tok.model).__name__ == "BPE":
            cleanup = False  # transformers ignores the cleanup for BPE models (it would eat real spaces)
        return cls(tok, special, find_chat_template(root), cleanup)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("eos_token"))

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("bos_token"))

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("pad_token"))

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for a, b in _CLEANUP:
                text = text.replace(a, b)
        return text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation rendered as text (``tokenize=False`` in transformers)."""
        if self.chat_template is None:
            raise TokenizerError("the export has no chat template (the checkpoint had none); re-export from a "
                                 "checkpoint whose tokenizer or processor has a chat_template")
        import jinja2

        try:
            return compile_chat_template(self.chat_template).render(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise TokenizerError(f"the chat template failed on this conversation: {e}") from None

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """Ids of SentencePiece-style byte tokens ``<0x00>..<0xFF>`` (none in byte-level BPE vocabularies)."""
    return frozenset(i for i in (tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None)


class StreamDecoder:
    """Incremental detokenization: ``push(id)`` returns the new text (possibly ``""``), ``flush()`` the rest.

    Each step decodes a short window of ids (from the last emitted boundary) and emits only what the window adds
    beyond the previous one, and only when it does not end in U+FFFD (an incomplete UTF-8 character), so
    ``"".join(pieces) + flush()`` equals ``decode(all ids)`` (vLLM / TGI's offsets scheme). Byte-fallback tokens
    (``<0xNN>``) are held until a normal token follows: the decoder judges a run of them as one UTF-8 string (so
    are skipped special tokens, which join the byte runs around them).
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.hold_ids = byte_fallback_ids(tokenizer.tokenizer)
        if skip_special_tokens:
            self.hold_ids |= {i for i, t in tokenizer.tokenizer.get_added_tokens_decoder().items() if t.special}

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:stop], skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self.ids[-1] in self.hold_ids:
            return ""
        before, now = self._decode(self.prefix, self.read), self._decode(self.prefix)
        if len(now) > len(before) and not now.endswith(REPLACEMENT_CHAR):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes to U+FFFD)."""
        before, now = self._decode(self.prefix, self.read), self._decode(self.prefix)
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
