"""Model integrations on top of the plain-PyTorch API (ops know nothing of models)."""
