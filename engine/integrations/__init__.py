"""The integrations floor: the config and the runtime built from it, and one small module per outside system."""
