"""What the front ends do alike with a call's prompts: check them (`prompt_list`), give each its
sampling parameters (`params_per_prompt`), and tokenise a text prompt (`prompt_token_ids`)."""

from __future__ import annotations

from collections.abc import Sequence

from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.model.loader import LoadedModel
from dendrite_jax.validation import check_text, is_int

Prompt = str | list[int]


def prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """Prompts as a list of strings (valid Unicode) and token-id lists (integers, not bools:
    bytes are not token ids)."""
    if isinstance(prompts, str):
        return [check_text(prompts, "prompt")]
    if not isinstance(prompts, list | tuple):
        raise ValueError(f"prompts must be a string, a list of token ids or a list of those, "
                         f"got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if all(is_int(p) for p in prompts):
        return [prompts]
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            check_text(p, f"prompts[{i}]")
        elif not (isinstance(p, list | tuple) and all(is_int(t) for t in p)):
            raise ValueError(f"prompts[{i}] must be a string or a list of token ids (integers), "
                             f"got {p!r:.80}")
    return [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]


def params_per_prompt(sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                      count: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: the default, one given for all, or one given for each."""
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    if not isinstance(sampling_params, list | tuple):
        raise ValueError(f"sampling_params must be a SamplingParams or a list of them, got "
                         f"{type(sampling_params).__name__}")
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts; pass one, or "
                         "one per prompt")
    return params


def prompt_token_ids(model: LoadedModel, prompt: Prompt) -> list[int]:
    """A prompt's token ids: a text prompt tokenised with the model's tokenizer."""
    if not isinstance(prompt, str):
        return list(prompt)
    if model.tokenizer is None:
        raise ValueError(f"{model.source} has no tokenizer; pass token-id prompts")
    return model.tokenizer.encode(prompt)
