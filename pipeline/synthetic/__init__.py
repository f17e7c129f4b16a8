"""Synthetic, deterministic data used by the embedded demo and its tiny model: the world
(``world``), the demo data (``demo_assets``), the training examples (``training_data``), and the
tiny model's tokenizer, model and training (``tiny_tokenizer``, ``tiny_model``, ``tiny_training``)."""
