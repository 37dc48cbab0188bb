"""layerscope: which layers of a transformer language model matter, why, and what to do with that.

The public API::

    model, tokenizer = layerscope.load_model("smollm2-135m")
    result, folder = layerscope.ablate("smollm2-135m", window=1, out="runs/demo")
    rows = layerscope.evaluate_model("smollm2-135m", data="builtin", tasks=["piqa"])
    result, folder = layerscope.cka_study("smollm2-135m", instructions="dolly", samples=128)
"""

__version__ = "0.1.0"

from .errors import LayerscopeError  # noqa: E402
from .models import architecture, load_model, model_fingerprint  # noqa: E402
from .interventions import SkipBlock, ZeroRole, intervene  # noqa: E402
from .api import ablate, cka_study, evaluate_model  # noqa: E402

__all__ = ["__version__", "LayerscopeError", "load_model", "architecture", "model_fingerprint",
           "intervene", "SkipBlock", "ZeroRole", "ablate", "cka_study", "evaluate_model"]
