"""One module per technique, each calling ``registry.register(Case(...))``."""
