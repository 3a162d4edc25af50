"""``etha://`` in the pods of ML job kinds: the rank and world size they provide."""

from __future__ import annotations

import pytest

from etha.distributed.rendezvous import parse_url
from etha.kvstore.errors import ConfigurationError

#: What a Kubeflow TrainJob's torch runtime puts into node 2 of 4 (kubeflow/trainer).
TRAINJOB_NODE = {
    "PET_NNODES": "4",
    "PET_NODE_RANK": "2",
    "PET_NPROC_PER_NODE": "1",
    "PET_MASTER_ADDR": "llm-node-0-0.llm",
    "PET_MASTER_PORT": "29400",
}


def test_trainjob_pod_with_one_process_uses_node_rank_and_count() -> None:
    spec = parse_url("etha://run", TRAINJOB_NODE)
    assert (spec.rank, spec.world_size) == (2, 4)
    # PET_NPROC_PER_NODE unset means one process too.
    one = {k: v for k, v in TRAINJOB_NODE.items() if k != "PET_NPROC_PER_NODE"}
    assert (parse_url("etha://run", one).rank, parse_url("etha://run", one).world_size) == (2, 4)


def test_rank_and_world_size_win_over_the_node_variables() -> None:
    # A PyTorchJob pod (kubeflow/training-operator) sets both; torchrun's workers too.
    env = {**TRAINJOB_NODE, "RANK": "5", "WORLD_SIZE": "8", "PET_NPROC_PER_NODE": "2"}
    spec = parse_url("etha://run", env)
    assert (spec.rank, spec.world_size) == (5, 8)


def test_several_processes_per_pod_need_torchrun() -> None:
    with pytest.raises(ConfigurationError, match="start the processes with torchrun"):
        parse_url("etha://run", {**TRAINJOB_NODE, "PET_NPROC_PER_NODE": "8"})


def test_without_any_rank_the_error_names_rank() -> None:
    with pytest.raises(ConfigurationError, match="set RANK"):
        parse_url("etha://run", {"PET_NNODES": "4"})
