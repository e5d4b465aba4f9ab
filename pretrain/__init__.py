"""Model, attention rule, loss, packing and (in later modules) the training stack."""
