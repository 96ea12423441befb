"""Documented path of the ``llamatelemetry-kvcache`` component (``pip install "llamatelemetry[kvcache]"``).

The installed component does not provide the documented names yet: each raises an error that says so.
"""

from llamatelemetry._components import import_component, not_yet_provided

import_component("kvcache")

__all__: list[str] = []


def __getattr__(name: str) -> object:
    raise not_yet_provided("kvcache", name)
