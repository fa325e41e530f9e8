"""Ready graphs: each public module exposes ``build(**options) -> Graph``.

Private modules (``_*.py``) hold what the graphs are built from: the byte-level models and
their slot caches (``_tiny_lm_model``, ``_lstm_model``), the shared serving protocol
(``_slots``), the weights format (``_weights``) and the training corpus (``_corpus``).
Trained weights live in ``weights/``.
"""
