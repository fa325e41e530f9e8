"""``hf.causal_lm``: a continuous-batching ``generate`` node over a Hugging Face causal LM."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .._errors import GraphError
from ..graph import Node
from ..graph._generation import generate
from ._load import check_checkpoint, load_model, load_tokenizer, offline, resolve_dtype
from ._step import HFStepModel
from ._tokens import token_bytes_table

__all__ = ["causal_lm", "chat_renderer", "check_attention", "eos_ids", "max_positions_of"]


def _wants_cuda(placement: str) -> bool:
    if placement.startswith("cuda"):
        return True
    return placement == "auto" and torch.cuda.is_available()


def _device(cuda: bool) -> torch.device:
    # The CUDA executor makes the replica's device current in its thread.
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def eos_ids(model_or_config: Any, tokenizer: Any = None) -> tuple[int, ...]:
    """End-of-sequence ids: the generation config's, else the model config's, else the
    tokenizer's."""
    for source in (
        getattr(model_or_config, "generation_config", None),
        getattr(model_or_config, "config", model_or_config),
        tokenizer,
    ):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            values = [value] if isinstance(value, int) else list(value)
            return tuple(int(v) for v in values)
    return ()


def max_positions_of(config: Any) -> int | None:
    """The model's context in tokens (``max_position_embeddings``), if the config says."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def chat_renderer(
    tokenizer: Any, template: str | None = None
) -> Callable[[list[dict[str, str]]], list[int]]:
    """``messages -> token ids`` through the tokenizer's ``apply_chat_template`` (its own
    template, or ``template``), with the generation prompt: the ids the model would get
    from ``apply_chat_template(..., add_generation_prompt=True)``."""

    def render(messages: list[dict[str, str]]) -> list[int]:
        ids = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        return [int(t) for t in ids]

    return render


def check_attention(where: str, config: Any) -> None:
    """Refuses models whose cache is not one full-attention KV per layer.

    Raises:
        GraphError: sliding-window or hybrid layers (their masks count cache columns, which
            the packed cache's padding would shift).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or ()
    other = sorted({str(t) for t in types if t != "full_attention"})
    sliding = getattr(text, "sliding_window", None)
    if not other and sliding and getattr(text, "use_sliding_window", True):
        other = [f"sliding_window={sliding}"]
    if other:
        raise GraphError(
            f"{where}: {getattr(text, 'model_type', 'this model')} has {', '.join(other)} "
            "layers; causal_lm serves full-attention decoder models only"
        )


def _default_name(source: Any) -> str:
    raw = Path(source).name if isinstance(source, str | Path) else type(source).__name__
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", raw) or "lm"
    return name if re.match(r"[A-Za-z_]", name) else f"lm_{name}"


def causal_lm(
    path_or_model: str | Path | Any,
    *,
    tokenizer: Any = None,
    max_batch: int = 32,
    placement: str = "auto",
    dtype: Any = None,
    threads: int | None = None,
    name: str | None = None,
    max_new_tokens: int = 128,
    chat_template: str | Callable[[list[dict[str, str]]], str | list[int]] | None = None,
    **options: Any,
) -> Node:
    """A ``generate`` node (continuous batching) serving a Hugging Face causal LM.

    Args:
        path_or_model: a local checkpoint directory (``config.json``, weights, tokenizer
            files), or a loaded ``PreTrainedModel`` (then ``tokenizer`` is required).
        tokenizer: a loaded tokenizer, or a directory to load one from; default: the
            checkpoint's own.
        max_batch: sequences decoded together per replica (its KV-cache slots).
        placement: ``"auto"`` (CUDA when available, else a thread), ``"thread"``,
            ``"cuda"``/``"cuda:N"``.
        dtype: weights dtype (torch dtype or ``"float32"``, ``"float16"``, ``"bfloat16"``);
            default float32 on CPU, float16 on CUDA.
        threads: intra-op torch threads of the replica's thread (CPU).
        name: the node's name (default: the directory's name).
        max_new_tokens: tokens generated when a request does not say.
        chat_template: a Jinja template (rendered by the tokenizer's
            ``apply_chat_template``) or a callable ``messages -> str | token ids``;
            default: the tokenizer's own template, if it has one.
        **options: further ``df.generate`` options (``temperature``, ``top_k``, ``top_p``,
            ``max_new_tokens_limit``, ``replicas``, ``capacity``, ``eos``).

    Returns:
        The node: input a str (tokenized with the tokenizer, special tokens as it adds
        them), token ids, or chat messages; output ``str`` chunks (special tokens skipped).

    Raises:
        GraphError: a missing file, no tokenizer for a loaded model, a bad option.
    """
    where = (
        f"causal_lm {str(path_or_model)!r}"
        if isinstance(path_or_model, str | Path)
        else "causal_lm"
    )
    offline()
    cuda = _wants_cuda(placement)
    torch_dtype = resolve_dtype(where, dtype, cuda)
    if isinstance(path_or_model, str | Path):
        root = check_checkpoint(where, path_or_model, tokenizer=tokenizer is None)
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        config = AutoConfig.from_pretrained(str(root), local_files_only=True)
        try:
            gen_config: Any = GenerationConfig.from_pretrained(str(root), local_files_only=True)
        except OSError:  # no generation_config.json: the model config's ids
            gen_config = None
        eos_source: Any = gen_config if gen_config is not None else config
        loaded: Any = None

        def load() -> Any:
            return load_model(where, root, torch_dtype, _device(cuda), AutoModelForCausalLM)

    else:
        loaded = path_or_model
        if tokenizer is None:
            raise GraphError(
                f"{where}: a loaded model needs tokenizer= (a tokenizer or a directory)"
            )
        config = loaded.config
        eos_source = loaded
        root = None

        def load() -> Any:
            model = loaded
            if dtype is not None or cuda:
                model = model.to(device=_device(cuda), dtype=torch_dtype)
            return model.eval()

    if tokenizer is None:
        assert root is not None  # a loaded model without a tokenizer was refused above
        tokenizer = load_tokenizer(where, root)
    elif isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(where, tokenizer)
    eos = options.pop("eos", None)
    if eos is None:
        eos = eos_ids(eos_source, tokenizer)
    if chat_template is None or isinstance(chat_template, str):
        template = chat_template or getattr(tokenizer, "chat_template", None)
        renderer: Any = chat_renderer(tokenizer, chat_template) if template else None
    else:
        renderer = chat_template
    check_attention(where, config)
    vocab = int(getattr(config.get_text_config(), "vocab_size", 0) or 0)
    table = token_bytes_table(tokenizer, vocab)
    context = max_positions_of(config)

    def decode(token: int) -> bytes:
        return table[token] if 0 <= token < len(table) else b""

    def encode(text: str) -> Sequence[int]:
        return [int(t) for t in tokenizer(text)["input_ids"]]

    def factory(max_batch: int) -> HFStepModel:
        return HFStepModel(load(), max_batch, context)

    factory.__name__ = name or _default_name(path_or_model)
    return generate(
        factory,
        name=name or _default_name(path_or_model),
        max_batch=max_batch,
        max_new_tokens=max_new_tokens,
        placement=placement,
        threads=threads,
        eos=eos,
        decode=decode,
        encode=encode,
        chat_template=renderer,
        **options,
    )
