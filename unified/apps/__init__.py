"""Applications over a trained model: the OpenAI-compatible server (serve.py) and its helpers."""
