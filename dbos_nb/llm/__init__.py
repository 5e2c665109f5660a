"""LLM helpers: a local OpenAI-compatible fake server for tests, notebooks and the demo."""
