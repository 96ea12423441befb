"""Documented path of the ``llamatelemetry-tensorcore`` component (``pip install "llamatelemetry[tensorcore]"``).

The installed component does not provide the documented names yet: each raises an error that says so.
"""

from llamatelemetry._components import import_component, not_yet_provided

import_component("tensorcore")

__all__: list[str] = []


def __getattr__(name: str) -> object:
    raise not_yet_provided("tensorcore", name)
