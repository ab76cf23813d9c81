"""Engine protocol and implementations; only ``server.engine.hf`` (and its helpers) import torch."""
