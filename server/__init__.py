"""HTTP front ends: the OpenAI-compatible app (openai_api.py) and the original-schema app (api.py)."""
