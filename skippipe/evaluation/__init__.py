"""Using a trained checkpoint: perplexity with omitted stages (omission.py) and the Hugging Face export
(export.py). Built on the runtime; the runtime never imports it."""
