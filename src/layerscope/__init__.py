"""layerscope: which layers of a transformer language model matter, why, and what to do with that."""
__version__ = "0.1.0"
