"""bench.heartbeat_cost's reading of `go tool pprof -traces`: sample values and stacks, and
each stack charged to the most nested step of a write it passes through."""

from __future__ import annotations

import pytest

from bench.heartbeat_cost import SHARES, classify, parse_traces

TRACES = """File: kube-apiserver
Type: cpu
Duration: 20.04s, Total samples = 18.56s (92.63%)
-----------+-------------------------------------------------------
      10ms   encoding/json.mapEncoder.encode
             k8s.io/apimachinery/pkg/util/managedfields/internal.(*FieldManager).Update
             k8s.io/apiserver/pkg/endpoints/handlers.(*jsonPatcher).applyPatchToCurrentObject
             k8s.io/apiserver/pkg/storage/etcd3.(*store).GuaranteedUpdate
-----------+-------------------------------------------------------
     1.5ms   github.com/google/cel-go/interpreter.(*evalWatch).Exec
             k8s.io/apiserver/pkg/admission/plugin/policy/validating.(*validator).Validate
             k8s.io/apiserver/pkg/storage/etcd3.(*store).GuaranteedUpdate
-----------+-------------------------------------------------------
         1s   runtime.gcBgMarkWorker
-----------+-------------------------------------------------------
"""


def test_parse_traces_reads_every_sample_with_its_stack_leaf_first() -> None:
    samples = list(parse_traces(TRACES))
    assert [value for value, _ in samples] == pytest.approx([0.01, 0.0015, 1.0])
    assert samples[0][1][0] == "encoding/json.mapEncoder.encode"
    assert samples[0][1][-1] == "k8s.io/apiserver/pkg/storage/etcd3.(*store).GuaranteedUpdate"
    assert samples[2][1] == ["runtime.gcBgMarkWorker"]


def test_a_stack_goes_to_the_most_nested_step_it_passes_through() -> None:
    names = [classify(frames) for _, frames in parse_traces(TRACES)]
    assert names == ["managed fields", "admission policies", "garbage collection (background)"]
    assert classify(["main.main"]) == "other"
    assert len({name for name, _ in SHARES}) == len(SHARES)
