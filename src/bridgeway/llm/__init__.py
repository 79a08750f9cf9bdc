"""The OpenAI-compatible LLM router: providers (wire formats), one call to one deployment (client)."""
