"""``llamatelemetry.cuda.graphs`` re-exports the llamatelemetry-graphs component, names and objects alike."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

import llamatelemetry_graphs
from llamatelemetry._components import COMPONENTS, install_command


def test_guide_imports_are_the_components_objects() -> None:
    from llamatelemetry.cuda.graphs import CUDAGraph, GraphCaptureConfig, GraphPool, capture_graph

    assert CUDAGraph is llamatelemetry_graphs.CUDAGraph
    assert GraphCaptureConfig is llamatelemetry_graphs.GraphCaptureConfig
    assert GraphPool is llamatelemetry_graphs.GraphPool
    assert capture_graph is llamatelemetry_graphs.capture_graph


def test_all_matches_the_module_and_the_component() -> None:
    graphs = importlib.import_module("llamatelemetry.cuda.graphs")
    public = {name for name in vars(graphs) if not name.startswith("_")} - {"missing_component"}
    assert set(graphs.__all__) == public
    assert len(graphs.__all__) == len(set(graphs.__all__))
    for name in graphs.__all__:
        assert getattr(graphs, name) is getattr(llamatelemetry_graphs, name), name
        assert name in llamatelemetry_graphs.__all__


def test_every_documented_name_is_exported() -> None:
    graphs = importlib.import_module("llamatelemetry.cuda.graphs")
    documented = COMPONENTS["graphs"].documented_names
    assert set(documented) <= set(graphs.__all__)
    assert {"CUDAGraph", "GraphCaptureConfig", "GraphPool", "capture_graph"} <= set(documented)
    assert {"replay_graph", "enable_cuda_graphs", "BatchBucketedGraphs", "GraphCaptureError"} <= set(documented)


def test_a_missing_component_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llamatelemetry_graphs", None)
    monkeypatch.delitem(sys.modules, "llamatelemetry.cuda.graphs", raising=False)
    with pytest.raises(ImportError, match=re.escape(install_command("graphs"))):
        importlib.import_module("llamatelemetry.cuda.graphs")
    monkeypatch.delitem(sys.modules, "llamatelemetry.cuda.graphs", raising=False)
