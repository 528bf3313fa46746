"""Readers and checkers for the deployment files in cluster/ (used by test_manifests.py).

Each helper does one thing: load YAML documents, parse a cron expression, split a shell script
into simple commands, parse a Dockerfile, read Kubernetes quantities, or describe the Ray worker
groups of a launcher config / KubeRay cluster spec. Errors are one-line ``ManifestError``s naming
the file or field and the fix.
"""
from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


class ManifestError(ValueError):
    """A problem in a deployment file: one line naming the file/field and the fix."""


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------
def load_docs(path: Path) -> list[dict]:
    """All non-empty documents of a (multi-document) YAML file; each must be a mapping."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ManifestError(f"{rel(path)}{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ManifestError(f"{rel(path)}: document {i} is a {type(doc).__name__}, expected a mapping")
    return docs


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


# --------------------------------------------------------------------------------------------
# Cron expressions (the 5-field form used by Kubernetes CronJob, KubeRay RayCronJob and crontab)
# --------------------------------------------------------------------------------------------
_MONTHS = {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
_DAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
# (name, lowest, highest, names allowed in place of numbers)
CRON_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _DAYS),
)


@dataclass(frozen=True)
class CronSchedule:
    """The sets of values each field matches (day-of-week 7 is folded into 0 = Sunday)."""

    minute: frozenset[int]
    hour: frozenset[int]
    day_of_month: frozenset[int]
    month: frozenset[int]
    day_of_week: frozenset[int]

    def runs_once_a_day(self) -> bool:
        """True when the schedule fires exactly once on every day of the year."""
        return (
            len(self.minute) == 1
            and len(self.hour) == 1
            and self.day_of_month == frozenset(range(1, 32))
            and self.month == frozenset(range(1, 13))
            and self.day_of_week == frozenset(range(0, 7))
        )


def parse_cron(expr: str) -> CronSchedule:
    """Parse ``minute hour day-of-month month day-of-week``.

    Each field is a comma list of items; an item is ``*``, ``N``, ``A-B`` or a name (months,
    weekdays), optionally followed by ``/STEP``. ``N/STEP`` means ``N-max/STEP``. Macros such as
    ``@daily`` are rejected: write the five fields.
    """
    if not isinstance(expr, str):
        raise ManifestError(f"cron schedule {expr!r} is not a string: quote it in YAML, e.g. \"0 2 * * *\"")
    fields = expr.split()
    if len(fields) != 5:
        raise ManifestError(
            f"cron {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"
        )
    sets = []
    for text, (name, lo, hi, names) in zip(fields, CRON_FIELDS):
        values: set[int] = set()
        for item in text.split(","):
            values |= _cron_item(expr, name, item, lo, hi, names)
        if name == "day-of-week" and 7 in values:
            values = (values - {7}) | {0}
        sets.append(frozenset(values))
    return CronSchedule(*sets)


def _cron_value(expr: str, name: str, tok: str, lo: int, hi: int, names: dict[str, int]) -> int:
    if tok.lower() in names:
        return names[tok.lower()]
    if not tok.isdigit():
        kind = "a number or a name" if names else "a number"
        raise ManifestError(f"cron {expr!r}: {name} value {tok!r} is not {kind}")
    value = int(tok)
    if not lo <= value <= hi:
        raise ManifestError(f"cron {expr!r}: {name} value {value} is outside {lo}-{hi}")
    return value


def _cron_item(expr: str, name: str, item: str, lo: int, hi: int, names: dict[str, int]) -> set[int]:
    if item == "":
        raise ManifestError(f"cron {expr!r}: empty item in the {name} field (stray comma?)")
    base, slash, step_txt = item.partition("/")
    step = 1
    if slash:
        if not step_txt.isdigit() or int(step_txt) < 1:
            raise ManifestError(f"cron {expr!r}: {name} step {step_txt!r} must be a positive integer")
        step = int(step_txt)
    if base == "*":
        start, end = lo, hi
    elif "-" in base:
        a, _, b = base.partition("-")
        start, end = _cron_value(expr, name, a, lo, hi, names), _cron_value(expr, name, b, lo, hi, names)
        if start > end:
            raise ManifestError(f"cron {expr!r}: {name} range {base!r} runs backwards")
    else:
        start = _cron_value(expr, name, base, lo, hi, names)
        end = hi if slash else start
    return set(range(start, end + 1, step))


# --------------------------------------------------------------------------------------------
# Shell commands
# --------------------------------------------------------------------------------------------
_PUNCT = set("();<>|&")
SHELLS = {"bash", "sh"}


def shell_tokens(line: str) -> list[str]:
    """Tokens of one shell line, with operators (``&&``, ``;``, ``|``, ``>>``...) as own tokens."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    try:
        return list(lex)
    except ValueError as err:
        raise ManifestError(f"shell line {line!r}: {err} (unbalanced quotes?)") from None


def is_operator(tok: str) -> bool:
    return bool(tok) and (set(tok) <= _PUNCT or tok in ("{", "}"))


def simple_commands(script: str) -> list[list[str]]:
    """Split a shell script into its simple commands (argv lists), recursing into ``bash -c``.

    Operators, redirections, subshell parentheses and braces end a command; what follows a
    redirection or ``$(`` shows up as a short command of its own, which callers ignore because
    it does not start with a program they look for.
    """
    out: list[list[str]] = []
    for line in script.splitlines():
        cur: list[str] = []
        for tok in shell_tokens(line):
            if is_operator(tok):
                if cur:
                    out.append(cur)
                cur = []
            else:
                cur.append(tok)
        if cur:
            out.append(cur)
    return [cmd for argv in out for cmd in expand_shell(argv)]


def expand_shell(argv: list[str]) -> list[list[str]]:
    """``bash -c SCRIPT`` -> the commands of SCRIPT; anything else -> ``[argv]``."""
    if len(argv) >= 3 and posixpath.basename(argv[0]) in SHELLS and argv[1] == "-c":
        return simple_commands(argv[2])
    return [argv]


def top_level_operators(line: str) -> list[str]:
    """Shell operators outside quotes in one command line (``&&``, ``;``, ``|``, ``>``...)."""
    return [tok for tok in shell_tokens(line) if is_operator(tok)]


def program(argv: list[str]) -> str:
    return posixpath.basename(argv[0]) if argv else ""


_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def substitute_vars(text: str) -> str:
    """Replace ``$NAME`` / ``${NAME}`` by a stand-in value so a string can be type-checked."""
    return _VAR.sub(lambda m: f"{m.group(1).lower()}-20260101", text)


def dotted_overrides(tokens: list[str]) -> list[str]:
    """The ``section.key=value`` arguments of a command line."""
    return [t for t in tokens if not t.startswith("-") and re.match(r"^[a-z_]+(\.[a-z_]+)+=", t)]


def option(argv: list[str], flag: str) -> str | None:
    """Value of ``--flag VALUE`` or ``--flag=VALUE`` in argv (None when absent)."""
    for i, tok in enumerate(argv):
        if tok == flag and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def flags(argv: list[str]) -> set[str]:
    return {t.split("=", 1)[0] for t in argv if t.startswith("--")}


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with comments dropped and ``\\`` continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, args = buf.strip().partition(" ")
        out.append((word.upper(), args.strip()))
        buf = ""
    if buf.strip():
        raise ManifestError(f"Dockerfile ends inside a continued line: {buf.strip()[:60]!r}")
    return out


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Default values of ``ARG NAME=VALUE`` lines."""
    out = {}
    for word, args in instructions:
        if word == "ARG" and "=" in args:
            k, v = args.split("=", 1)
            out[k.strip()] = v.strip().strip('"')
    return out


def expand_args(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


# --------------------------------------------------------------------------------------------
# Kubernetes quantities and pod specs
# --------------------------------------------------------------------------------------------
_SUFFIX = {"m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity (``"500m"``, ``8``, ``"16Gi"``) as a number."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2) not in _SUFFIX:
        raise ManifestError(f"resource quantity {value!r} is not a number with a Kubernetes suffix (m, Mi, Gi...)")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def limit(container: dict, name: str) -> float:
    """The container's limit for a resource (falling back to its request), 0 when unset."""
    res = container.get("resources") or {}
    for part in ("limits", "requests"):
        if name in (res.get(part) or {}):
            return quantity(res[part][name])
    return 0.0


def env_value(container: dict, name: str) -> dict | None:
    for item in container.get("env") or []:
        if item.get("name") == name:
            return item
    return None


@dataclass
class MountedFile:
    volume: dict
    key: str  # path inside the volume


def find_mount(pod_spec: dict, path: str) -> MountedFile | None:
    """The volume (and path inside it) that ``path`` lies on in the pod's first container."""
    container = pod_spec["containers"][0]
    best = None
    for mount in container.get("volumeMounts") or []:
        root = mount["mountPath"].rstrip("/")
        if path == root or path.startswith(root + "/"):
            if best is None or len(root) > len(best[0]):
                best = (root, mount["name"])
    if best is None:
        return None
    root, name = best
    volume = next((v for v in pod_spec.get("volumes") or [] if v.get("name") == name), None)
    if volume is None:
        raise ManifestError(f"volumeMount {name!r} has no volume of that name in the pod spec")
    return MountedFile(volume=volume, key=path[len(root):].lstrip("/"))


def configmap_text(volume: dict, key: str, configmaps: dict[str, dict]) -> str:
    """Content of ``key`` in the ConfigMap behind a configMap volume (honours ``items``)."""
    name = volume["configMap"]["name"]
    if name not in configmaps:
        raise ManifestError(f"ConfigMap {name!r} is mounted but defined nowhere under cluster/")
    data = configmaps[name].get("data") or {}
    items = volume["configMap"].get("items")
    if items:
        by_path = {it["path"]: it["key"] for it in items}
        if key not in by_path:
            raise ManifestError(f"ConfigMap {name!r} volume does not project {key!r} (items: {sorted(by_path)})")
        key = by_path[key]
    if key not in data:
        raise ManifestError(f"ConfigMap {name!r} has no key {key!r} (keys: {sorted(data)})")
    return data[key]


# --------------------------------------------------------------------------------------------
# Worker groups: what a cluster can host
# --------------------------------------------------------------------------------------------
@dataclass
class NodeGroup:
    """One node type / worker group: Ray resources per node and how many nodes it may have."""

    name: str
    cpus: float
    gpus: float
    replicas: int  # nodes there at start
    max_nodes: int  # nodes the autoscaler may reach
    head: bool = False


def launcher_groups(cfg: dict) -> list[NodeGroup]:
    out = []
    for name, node in cfg["available_node_types"].items():
        head = name == cfg["head_node_type"]
        res = node.get("resources") or {}
        out.append(
            NodeGroup(
                name=name,
                cpus=float(res.get("CPU", 0)),
                gpus=float(res.get("GPU", 0)),
                replicas=1 if head else int(node.get("min_workers", 0)),
                max_nodes=1 if head else int(node.get("max_workers", cfg.get("max_workers", 0))),
                head=head,
            )
        )
    return out


def _ray_pod_resources(group_spec: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees in a pod: rayStartParams num-cpus/num-gpus, else the container limits."""
    params = group_spec.get("rayStartParams") or {}
    container = group_spec["template"]["spec"]["containers"][0]
    cpus = float(params["num-cpus"]) if "num-cpus" in params else limit(container, "cpu")
    gpus = float(params["num-gpus"]) if "num-gpus" in params else limit(container, "nvidia.com/gpu")
    return cpus, gpus


def kuberay_groups(cluster_spec: dict) -> list[NodeGroup]:
    cpus, gpus = _ray_pod_resources(cluster_spec["headGroupSpec"])
    out = [NodeGroup("head", cpus, gpus, 1, 1, head=True)]
    for g in cluster_spec.get("workerGroupSpecs") or []:
        cpus, gpus = _ray_pod_resources(g)
        hosts = int(g.get("numOfHosts", 1))
        out.append(
            NodeGroup(
                name=g["groupName"],
                cpus=cpus,
                gpus=gpus,
                replicas=int(g.get("replicas", 0)) * hosts,
                max_nodes=int(g.get("maxReplicas", g.get("replicas", 0))) * hosts,
            )
        )
    return out


def check_capacity(where: str, ray_cfg: Any, groups: list[NodeGroup], autoscaling: bool) -> None:
    """Every node that hosts training workers fits whole workers, and enough of them exist.

    With G GPUs per Ray Train worker (``ray.resources_per_worker.GPU``, 1 by default when
    ``ray.use_gpu``) and C CPUs per worker, a GPU node with g GPUs and c CPUs hosts
    w = g / G workers and needs g % G == 0 and c >= w * C. The cluster must reach
    sum(w * nodes) >= ray.num_workers, with nodes = max nodes when it autoscales, else the
    nodes there at start.
    """
    rpw = dict(ray_cfg.resources_per_worker)
    gpw = float(rpw.get("GPU", 1.0 if ray_cfg.use_gpu else 0.0))
    cpw = float(rpw.get("CPU", 1.0))
    if ray_cfg.use_gpu:
        if gpw <= 0:
            raise ManifestError(f"{where}: ray.use_gpu is true but ray.resources_per_worker.GPU is {gpw}: set it >= 1")
        hosts = [g for g in groups if g.gpus > 0]
        if not hosts:
            raise ManifestError(f"{where}: ray.use_gpu is true but no node group has GPUs: add nvidia.com/gpu / GPU resources")
        capacity = 0
        for g in hosts:
            per_node = int(g.gpus // gpw)
            if per_node < 1 or abs(per_node * gpw - g.gpus) > 1e-9:
                raise ManifestError(
                    f"{where}: group {g.name} has {g.gpus:g} GPUs per node, not a whole number of workers "
                    f"at {gpw:g} GPU each: use a multiple of ray.resources_per_worker.GPU"
                )
            if g.cpus + 1e-9 < per_node * cpw:
                raise ManifestError(
                    f"{where}: group {g.name} hosts {per_node} workers x {cpw:g} CPU but has {g.cpus:g} CPUs: "
                    f"raise its CPUs or lower ray.resources_per_worker.CPU"
                )
            capacity += per_node * (g.max_nodes if autoscaling else g.replicas)
    else:
        capacity = sum(int(g.cpus // cpw) * (g.max_nodes if autoscaling else g.replicas) for g in groups) if cpw > 0 else 0
    if capacity < ray_cfg.num_workers:
        what = "max" if autoscaling else "initial"
        raise ManifestError(
            f"{where}: {what} capacity is {capacity} Ray Train workers but ray.num_workers is "
            f"{ray_cfg.num_workers}: add replicas/max workers or lower ray.num_workers"
        )
