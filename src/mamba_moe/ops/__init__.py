"""Pure functions: the math of the model, each fast path beside its plain reference."""
