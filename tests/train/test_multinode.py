"""Multi-node on one machine: ray.cluster_utils.Cluster with two 1-CPU nodes, one worker on each."""

import pytest

from helpers import run_config

pytestmark = pytest.mark.slow


@pytest.fixture
def two_node_cluster(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    monkeypatch.setenv("RLORA_SHARED_LOCAL_STORAGE", "1")  # one machine: the tmp dir is shared storage
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_nodes_one_worker_each(two_node_cluster, tiny_model_dir, task_dir, tmp_path):
    import ray

    from rlora.train.launcher import run_training

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    cfg = run_config(tiny_model_dir, task_dir, tmp_path, trainer__max_steps=4, trainer__save_steps=2,
                     trainer__run_name="two-nodes", ray__storage_path=str(tmp_path / "shared"))
    res = run_training(cfg)
    assert res.summary["global_step"] == 4
    assert len(set(res.summary["worker_nodes"])) == 2  # the two ranks ran on different nodes
    # the checkpoint holds the shards of both ranks, merged by Ray into one directory
    shards = sorted(p.name for p in (tmp_path / "shared" / "two-nodes").glob("checkpoint_*/ds/*optim_states.pt"))
    assert any("rank_0" in s for s in shards) and any("rank_1" in s for s in shards)
    assert (res.adapter_dir / "rlora_adapter.safetensors").is_file()


def test_local_storage_refused_on_two_nodes(two_node_cluster, tiny_model_dir, task_dir, tmp_path, monkeypatch):
    from rlora.config import ConfigError
    from rlora.train.launcher import run_training

    monkeypatch.delenv("RLORA_SHARED_LOCAL_STORAGE")
    with pytest.raises(ConfigError, match="local path but the cluster has 2 nodes"):
        run_training(run_config(tiny_model_dir, task_dir, tmp_path, ray__storage_path=str(tmp_path / "local")))


def test_lost_node_recovers_when_capacity_returns(two_node_cluster, tiny_model_dir, task_dir, tmp_path):
    """A node dies mid-run (its worker with it); Ray Train waits for capacity, a replacement node joins,
    and the run resumes from the newest complete checkpoint to the configured final step."""
    import threading
    import time

    import ray
    from mlflow.tracking import MlflowClient

    from rlora.train.launcher import run_training

    cfg = run_config(tiny_model_dir, task_dir, tmp_path, trainer__max_steps=16, trainer__save_steps=2,
                     trainer__run_name="lost-node", ray__storage_path=str(tmp_path / "shared"), ray__max_failures=2)
    out: dict = {}
    th = threading.Thread(target=lambda: out.setdefault("res", run_training(cfg)), daemon=True)
    th.start()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    deadline = time.time() + 300
    while time.time() < deadline:
        c = MlflowClient(uri)
        e = c.get_experiment_by_name("tests")
        runs = c.search_runs([e.experiment_id]) if e else []
        steps = [m.step for r in runs for m in c.get_metric_history(r.info.run_id, "train/loss")]
        if max(steps or [0]) >= 5:
            break
        time.sleep(0.5)
    # the console queue lives on the driver's node, so losing the worker node cannot take it along
    head = ray.get_runtime_context().get_node_id()
    queues = [a for a in ray.state.actors().values() if a["ActorClassName"] == "_QueueActor" and a["State"] == "ALIVE"]
    assert queues and all(a["Address"]["NodeID"] == head for a in queues), queues
    worker_node = [n for n in two_node_cluster.worker_nodes][0]
    two_node_cluster.remove_node(worker_node)          # the node and the rank on it are gone
    time.sleep(5)
    two_node_cluster.add_node(num_cpus=1)              # capacity returns
    th.join(timeout=600)
    assert "res" in out, "the run did not finish after the replacement node joined"
    s = out["res"].summary
    assert s["global_step"] == 16 and s["resumed_from_step"] >= 4
    assert len(set(s["worker_nodes"])) == 2
