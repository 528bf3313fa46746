"""The checkers used on cluster/ catch what they claim to catch (on small synthetic inputs)."""
from __future__ import annotations

import pytest

try:  # tests/ laid out as packages
    from . import manifest_checks as mc
except ImportError:
    import manifest_checks as mc

from rlora.config import RayConfig


# --------------------------------------------------------------------------------------------
# cron
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "expr,minute,hour,dow",
    [
        ("0 2 * * *", {0}, {2}, set(range(7))),
        ("*/15 1-3 * * mon-fri", {0, 15, 30, 45}, {1, 2, 3}, {1, 2, 3, 4, 5}),
        ("5,35 0 * * 7", {5, 35}, {0}, {0}),
        ("10/20 */12 * * SUN", {10, 30, 50}, {0, 12}, {0}),
    ],
)
def test_parse_cron_values(expr, minute, hour, dow):
    s = mc.parse_cron(expr)
    assert s.minute == minute and s.hour == hour and s.day_of_week == dow


def test_parse_cron_month_names_and_once_a_day():
    s = mc.parse_cron("30 4 1 jan,JUL *")
    assert s.month == {1, 7} and s.day_of_month == {1}
    assert not s.runs_once_a_day()
    assert mc.parse_cron("0 2 * * *").runs_once_a_day()
    assert mc.parse_cron("0 2 * * 0-6").runs_once_a_day()
    assert not mc.parse_cron("0 2,14 * * *").runs_once_a_day()
    assert not mc.parse_cron("0 2 * * 1-5").runs_once_a_day()


@pytest.mark.parametrize(
    "expr,fragment",
    [
        ("0 2 * *", "expected 5 fields"),
        ("0 2 * * * *", "expected 5 fields"),
        ("@daily", "expected 5 fields"),
        ("60 2 * * *", "minute value 60"),
        ("0 24 * * *", "hour value 24"),
        ("0 2 0 * *", "day-of-month value 0"),
        ("0 2 * 13 *", "month value 13"),
        ("0 2 * * 8", "day-of-week value 8"),
        ("0 2 * * funday", "not a number or a name"),
        ("0 5-2 * * *", "runs backwards"),
        ("*/0 2 * * *", "step"),
        ("0,,5 2 * * *", "empty item"),
        ("0 two * * *", "not a number"),
    ],
)
def test_parse_cron_rejects(expr, fragment):
    with pytest.raises(mc.ManifestError, match=fragment):
        mc.parse_cron(expr)


def test_parse_cron_rejects_non_string():
    with pytest.raises(mc.ManifestError, match="quote it"):
        mc.parse_cron(None)


# --------------------------------------------------------------------------------------------
# shell
# --------------------------------------------------------------------------------------------
def test_simple_commands_split_operators_and_recurse_into_bash_c():
    script = "set -e\nRUN=x && python jobs/train.py --config a.yaml k.v=$RUN; rlora register /o/$RUN --name n >> log 2>&1"
    cmds = mc.simple_commands(script)
    assert ["python", "jobs/train.py", "--config", "a.yaml", "k.v=$RUN"] in cmds
    assert ["rlora", "register", "/o/$RUN", "--name", "n"] in cmds
    nested = mc.simple_commands("bash -c 'cd /x && rlora submit c.yaml --wait'")
    assert ["rlora", "submit", "c.yaml", "--wait"] in nested
    assert ["cd", "/x"] in nested


def test_top_level_operators_ignore_quoted_ones():
    assert mc.top_level_operators("bash -c 'a && b; c | d'") == []
    assert mc.top_level_operators("cd /x && python t.py") == ["&&"]
    assert mc.top_level_operators("python t.py > out.log") == [">"]
    with pytest.raises(mc.ManifestError, match="quotes"):
        mc.top_level_operators("bash -c 'unterminated")


def test_overrides_options_and_vars():
    argv = ["rlora", "submit", "c.yaml", "--address", "http://h:8265", "--wait", "trainer.run_name=$RUN", "ray.num_workers=4"]
    assert mc.dotted_overrides(argv) == ["trainer.run_name=$RUN", "ray.num_workers=4"]
    assert mc.option(argv, "--address") == "http://h:8265"
    assert mc.option(["x", "--address=http://a"], "--address") == "http://a"
    assert mc.option(argv, "--name") is None
    assert mc.flags(argv) == {"--address", "--wait"}
    assert mc.substitute_vars("trainer.run_name=${RUN}") == "trainer.run_name=run-20260101"


# --------------------------------------------------------------------------------------------
# Dockerfile, quantities, mounts
# --------------------------------------------------------------------------------------------
def test_dockerfile_instructions_join_continuations_and_args():
    text = "# c\nARG V=1.2.3\nFROM img:${V}-gpu\nRUN pip install a \\\n    # note\n    && echo ok\nCOPY a b ./\n"
    instr = mc.dockerfile_instructions(text)
    assert [w for w, _ in instr] == ["ARG", "FROM", "RUN", "COPY"]
    assert "&& echo ok" in instr[2][1] and "note" not in instr[2][1]
    args = mc.dockerfile_args(instr)
    assert mc.expand_args(instr[1][1], args) == "img:1.2.3-gpu"
    with pytest.raises(mc.ManifestError, match="continued line"):
        mc.dockerfile_instructions("RUN a \\")


@pytest.mark.parametrize("value,expected", [("500m", 0.5), ("8", 8.0), (4, 4.0), ("16Gi", 16 * 2**30), ("1.5", 1.5)])
def test_quantity(value, expected):
    assert mc.quantity(value) == pytest.approx(expected)


def test_quantity_rejects_garbage():
    with pytest.raises(mc.ManifestError, match="quantity"):
        mc.quantity("eight")


def _pod(configmap_items=None):
    vol = {"name": "cfg", "configMap": {"name": "cm"}}
    if configmap_items:
        vol["configMap"]["items"] = configmap_items
    return {
        "containers": [{"name": "c", "volumeMounts": [{"name": "cfg", "mountPath": "/configs"}, {"name": "sh", "mountPath": "/mnt/shared"}]}],
        "volumes": [vol, {"name": "sh", "persistentVolumeClaim": {"claimName": "pvc"}}],
    }


def test_find_mount_and_configmap_text():
    cms = {"cm": {"data": {"train.yaml": "a: 1", "other": "b: 2"}}}
    m = mc.find_mount(_pod(), "/configs/train.yaml")
    assert m.key == "train.yaml" and mc.configmap_text(m.volume, m.key, cms) == "a: 1"
    assert mc.find_mount(_pod(), "/mnt/shared/outputs/x").volume["name"] == "sh"
    assert mc.find_mount(_pod(), "/elsewhere/x.yaml") is None
    m = mc.find_mount(_pod([{"key": "other", "path": "run.yaml"}]), "/configs/run.yaml")
    assert mc.configmap_text(m.volume, m.key, cms) == "b: 2"
    with pytest.raises(mc.ManifestError, match="no key"):
        mc.configmap_text(mc.find_mount(_pod(), "/configs/missing.yaml").volume, "missing.yaml", cms)
    with pytest.raises(mc.ManifestError, match="defined nowhere"):
        mc.configmap_text(m.volume, "run.yaml", {})


# --------------------------------------------------------------------------------------------
# capacity
# --------------------------------------------------------------------------------------------
def _groups(gpus_per_node, cpus_per_node, nodes, max_nodes):
    return [
        mc.NodeGroup("head", 8, 0, 1, 1, head=True),
        mc.NodeGroup("gpu", cpus_per_node, gpus_per_node, nodes, max_nodes),
    ]


def test_capacity_counts_workers_per_node():
    ray = RayConfig(num_workers=8, use_gpu=True, resources_per_worker={"CPU": 4, "GPU": 1})
    mc.check_capacity("t", ray, _groups(4, 48, 2, 2), autoscaling=False)  # 2 nodes x 4 workers
    with pytest.raises(mc.ManifestError, match="capacity is 4"):
        mc.check_capacity("t", ray, _groups(4, 48, 1, 3), autoscaling=False)
    mc.check_capacity("t", ray, _groups(4, 48, 0, 2), autoscaling=True)  # the autoscaler may add them
    with pytest.raises(mc.ManifestError, match="CPUs"):
        mc.check_capacity("t", ray, _groups(4, 8, 2, 2), autoscaling=False)  # 4 workers x 4 CPU > 8
    two = RayConfig(num_workers=2, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 2})
    with pytest.raises(mc.ManifestError, match="whole number"):
        mc.check_capacity("t", two, _groups(3, 8, 2, 2), autoscaling=False)
    with pytest.raises(mc.ManifestError, match="no node group has GPUs"):
        mc.check_capacity("t", ray, _groups(0, 48, 2, 2), autoscaling=False)


def test_capacity_cpu_only_run():
    ray = RayConfig(num_workers=2, resources_per_worker={"CPU": 1})
    mc.check_capacity("t", ray, [mc.NodeGroup("head", 2, 0, 1, 1, head=True)], autoscaling=False)
    with pytest.raises(mc.ManifestError, match="capacity is 2"):
        mc.check_capacity("t", RayConfig(num_workers=3), [mc.NodeGroup("head", 2, 0, 1, 1, head=True)], autoscaling=False)


def test_kuberay_groups_read_limits_and_start_params():
    def group(name, cpu, gpu, params=None, **reps):
        res = {"limits": {"cpu": cpu, "nvidia.com/gpu": gpu}} if gpu else {"limits": {"cpu": cpu}}
        return {"groupName": name, "rayStartParams": params or {}, **reps,
                "template": {"spec": {"containers": [{"name": "ray-worker", "resources": res}]}}}

    spec = {
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": {"spec": {"containers": [{"name": "ray-head", "resources": {"limits": {"cpu": "4"}}}]}}},
        "workerGroupSpecs": [group("gpu", "8", 2, replicas=1, maxReplicas=3), group("cpu", "500m", 0, replicas=2, maxReplicas=2)],
    }
    head, gpu, cpu = mc.kuberay_groups(spec)
    assert (head.cpus, head.gpus, head.head) == (0.0, 0.0, True)
    assert (gpu.cpus, gpu.gpus, gpu.replicas, gpu.max_nodes) == (8.0, 2.0, 1, 3)
    assert (cpu.cpus, cpu.gpus) == (0.5, 0.0)
