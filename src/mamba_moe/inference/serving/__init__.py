"""The OpenAI-compatible HTTP server: request validation, the model's worker thread, the FastAPI app."""
