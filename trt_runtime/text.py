"""Text <-> token ids for the runtime: the one seam a tokenizer / processor / chat-template module plugs into.

:class:`PromptText` is what the pipeline needs: ``encode(prompt) -> (ids before the image, ids after it)``,
``decode(ids) -> str`` and the EOS ids. The default renders LLaVA-1.5's conversation template
``USER: <image>\\n{prompt} ASSISTANT:`` with the preset's offline byte vocabulary (:mod:`vlmx.torch_ref.models`);
a checkpoint with its own tokenizer and chat template provides another object with the same three members
(:func:`prompt_text` is the one place that chooses).
"""
from __future__ import annotations

from vlmx.torch_ref import models

#: LLaVA-1.5 conversation template around the image and the user's prompt (the fallback template).
PROMPT_PREFIX = "USER: "
PROMPT_SUFFIX = "\n{prompt} ASSISTANT:"


class PromptText:
    """LLaVA-1.5 template over the preset's byte vocabulary (no tokenizer offline)."""

    def __init__(self, preset: str, eos_token_id: int | None = None):
        self.preset = preset
        self.eos_ids = {models.EOS_ID if eos_token_id is None else int(eos_token_id)}

    def encode(self, prompt: str) -> tuple[list[int], list[int]]:
        """(ids before the image, with BOS; ids after it) for one user turn."""
        return (models.encode_prompt(self.preset, PROMPT_PREFIX),
                models.encode_prompt(self.preset, PROMPT_SUFFIX.format(prompt=prompt), add_bos=False))

    def decode(self, ids) -> str:
        return models.decode_tokens(self.preset, ids)


def prompt_text(artifacts) -> PromptText:
    """The text seam for an export (issue 17: the checkpoint's tokenizer and chat template when it has them)."""
    return PromptText(artifacts.model, artifacts.info.get("eos_token_id"))
