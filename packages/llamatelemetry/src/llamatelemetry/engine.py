"""``llamatelemetry.engine``: the Llama-family inference engine (component ``llamatelemetry-engine``)."""

from llamatelemetry._components import missing_component
from llamatelemetry._components import reexported as _reexported

try:
    from llamatelemetry_engine import LLM as LLM
    from llamatelemetry_engine import EngineFlags as EngineFlags
    from llamatelemetry_engine import SamplingParams as SamplingParams
    from llamatelemetry_engine import load_model as load_model
except ImportError as exc:
    raise missing_component("engine", exc) from exc

__all__ = _reexported("engine", globals())
del _reexported
