"""Static checks of the cluster deployment files in cluster/ (and every command in README.md and docs/*.md).

Nothing here talks to a cluster. The tests
  * parse every YAML file (all documents) and the RayJob's embedded runtimeEnvYAML,
    and check the structure a Ray / KubeRay deployment needs;
  * extract EVERY `vpn-dist ...` command written in those files and parse it with
    the real CLI parser (`vpn_dist.cli.build_parser()`), so a misspelled flag or
    a removed option in the CLI breaks the build instead of a cluster job;
  * check the `ray job submit` options with Ray's own click command.

Where commands are looked for:
  * *.yaml / *.yml: every string value of every document (entrypoints, commands),
    except one-word values such as `cluster_name: vpn-dist`;
  * *.sh: the script text (shell comments are ignored);
  * *.md: fenced code blocks (a leading "$ " prompt is stripped).
Line continuations (backslash-newline) are joined first; a command runs from the
`vpn-dist` token to the end of the line or the first shell operator (&& ; | ...).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from cli_commands import check_vpn_command

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
# every vpn-dist command the README and the docs pages show
EXTRA_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ";;", "(", ")", "|&", ">", ">>", "<"}
KNOWN_RUNTIME_ENV_KEYS = {
    "working_dir", "py_modules", "excludes", "pip", "uv", "conda", "env_vars",
    "container", "image_uri", "py_executable", "config", "nsight", "java_jars",
}


# --------------------------------------------------------------------------- helpers


def _cluster_files() -> list[Path]:
    files = [p for p in sorted(CLUSTER.rglob("*")) if p.is_file()]
    files += [p for p in EXTRA_DOCS if p.is_file()]
    return files


def _yaml_files() -> list[Path]:
    return [p for p in _cluster_files() if p.suffix in (".yaml", ".yml")]


def _load_all(path: Path) -> list:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _strings(value)


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _logical_lines(text: str) -> list[str]:
    return re.sub(r"\\[ \t]*\n", " ", text).splitlines()


def _commands_in_text(text: str, program: str = "vpn-dist") -> list[list[str]]:
    """Every `program ...` command in shell-like text, as argv (program included)."""
    found = []
    for line in _logical_lines(text):
        if program not in line:
            continue
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        try:
            tokens = _tokens(line)
        except ValueError as err:  # unbalanced quotes
            raise AssertionError(f"cannot tokenize {line!r}: {err}") from err
        for i, tok in enumerate(tokens):
            if tok != program:
                continue
            argv = [tok]
            for nxt in tokens[i + 1:]:
                if nxt in SHELL_OPERATORS:
                    break
                argv.append(nxt)
            found.append(argv)
    return found


def _fenced_code(markdown: str) -> str:
    blocks = re.findall(r"^ *(```|~~~)[^\n]*\n(.*?)^ *\1", markdown, flags=re.S | re.M)
    return "\n".join(body for _, body in blocks)


def _texts_of(path: Path) -> list[str]:
    if path.suffix in (".yaml", ".yml"):
        # a value without whitespace ("vpn-dist" as a cluster or image name) is a name
        return [s for s in _strings(_load_all(path)) if re.search(r"\s", s.strip())]
    if path.suffix == ".sh":
        return [path.read_text()]
    if path.suffix == ".md":
        return [_fenced_code(path.read_text())]
    raise AssertionError(
        f"{path.relative_to(REPO)}: unknown file type in cluster/; teach "
        "tests/test_cluster_files.py where its vpn-dist commands live"
    )


def _all_commands(program: str = "vpn-dist") -> list[tuple[str, list[str]]]:
    out = []
    for path in _cluster_files():
        for text in _texts_of(path):
            for argv in _commands_in_text(text, program):
                out.append((str(path.relative_to(REPO)), argv))
    return out


VPN_COMMANDS = _all_commands("vpn-dist")


# --------------------------------------------------------------------------- YAML


def test_every_yaml_file_parses():
    files = _yaml_files()
    names = {p.relative_to(REPO).as_posix() for p in files}
    assert {"cluster/runtime_env.yaml", "cluster/aws-gpu.yaml",
            "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"} <= names
    for path in files:
        assert _load_all(path), f"{path} has no YAML documents"


def _runtime_env_excludes_check(env: dict, where: str):
    from pathlib import PurePosixPath

    assert set(env) <= KNOWN_RUNTIME_ENV_KEYS, f"{where}: unknown runtime_env keys {set(env) - KNOWN_RUNTIME_ENV_KEYS}"
    excludes = env.get("excludes") or []
    joined = " ".join(excludes)
    for must in (".venv", "data", "runs", "demo", ".git", ".beton"):
        assert must in joined, f"{where}: excludes lack {must!r}: {excludes}"
    try:
        from ray._private.runtime_env.packaging import _get_excludes
    except Exception:  # Ray internals moved: the string check above still stands
        return
    match = _get_excludes(REPO, excludes)
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", "data/cifar10/train.beton",
                 "runs/r1/tb/events.out", "demo/x.png", ".git/HEAD", "somewhere/else/val.beton"):
        assert match(REPO / PurePosixPath(path)), f"{where}: {path} would be uploaded"
    for path in ("vpn_dist/cli.py", "data_prep/__init__.py", "tune_spaces/__init__.py",
                 "pyproject.toml", "vpn_dist/data/__init__.py", "vpn_dist/runs.py"):
        assert not match(REPO / PurePosixPath(path)), f"{where}: {path} would NOT be uploaded"


def test_runtime_env():
    (env,) = _load_all(CLUSTER / "runtime_env.yaml")
    assert isinstance(env, dict)
    _runtime_env_excludes_check(env, "cluster/runtime_env.yaml")
    # the project must reach the workers somehow
    assert env.get("working_dir") or env.get("py_modules") or env.get("pip"), env
    if "env_vars" in env:  # Ray requires str -> str
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in env["env_vars"].items())
    try:
        from ray.runtime_env import RuntimeEnv
    except Exception:
        return
    RuntimeEnv(**env)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _gpus(container: dict) -> int:
    limits = (container.get("resources") or {}).get("limits") or {}
    return int(limits.get("nvidia.com/gpu", 0))


def _check_ray_cluster_spec(spec: dict, where: str) -> int:
    """Shared checks of a RayCluster spec; returns the number of worker GPUs."""
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker groups"
    for group in [head, *groups]:
        params = group.get("rayStartParams") or {}
        assert all(isinstance(v, str) for v in params.values()), \
            f"{where}: rayStartParams values must be strings: {params}"
    assert all(_gpus(c) == 0 for c in _containers(head["template"])), f"{where}: head should be CPU only"

    total_gpus = 0
    for pod in [head["template"], *(g["template"] for g in groups)]:
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for c in _containers(pod):
            assert "2.58.0" in c["image"], f"{where}: image {c['image']} is not a Ray 2.58.0 image"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            for path in ("/mnt/data", "/mnt/runs"):
                assert path in mounts, f"{where}: {c['name']} does not mount {path}"
                vol = volumes[mounts[path]]
                assert "persistentVolumeClaim" in vol or "hostPath" in vol, \
                    f"{where}: {path} is not on a PVC / hostPath: {vol}"
    for g in groups:
        gpu_per_pod = max(_gpus(c) for c in _containers(g["template"]))
        if gpu_per_pod:
            assert g["rayStartParams"].get("num-gpus") == str(gpu_per_pod), \
                f"{where}: group {g['groupName']} num-gpus != nvidia.com/gpu limit"
        total_gpus += gpu_per_pod * int(g.get("replicas", 0))
    assert any(max(_gpus(c) for c in _containers(g["template"])) > 0 for g in groups), \
        f"{where}: no GPU worker group"
    return total_gpus


def test_kuberay_raycluster():
    docs = _load_all(CLUSTER / "kuberay" / "raycluster.yaml")
    clusters = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1
    rc = clusters[0]
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["spec"]["rayVersion"] == "2.58.0"
    _check_ray_cluster_spec(rc["spec"], "raycluster.yaml")
    claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    used = {v["persistentVolumeClaim"]["claimName"]
            for tmpl in [rc["spec"]["headGroupSpec"]["template"],
                         *(g["template"] for g in rc["spec"]["workerGroupSpecs"])]
            for v in tmpl["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
    assert used <= claims, f"claims used but not defined: {used - claims}"


def test_kuberay_rayjob():
    docs = _load_all(CLUSTER / "kuberay" / "rayjob.yaml")
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(env, dict), "runtimeEnvYAML must be a YAML mapping"
    assert set(env) <= KNOWN_RUNTIME_ENV_KEYS, set(env)

    (argv,) = _commands_in_text(spec["entrypoint"])
    assert argv[1] == "train"
    ns_text = " ".join(argv)
    assert re.search(r"--workers 4\b", ns_text), ns_text
    assert "--gpu" in argv
    assert argv[argv.index("--data") + 1].startswith("/mnt/data/")
    assert argv[argv.index("--out") + 1].startswith("/mnt/runs/")
    if "rayClusterSpec" in spec:
        gpus = _check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
        assert gpus >= 4, f"--workers 4 --gpu needs 4 GPUs, the cluster has {gpus}"


def test_aws_cluster_launcher():
    (cfg,) = _load_all(CLUSTER / "aws-gpu.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_prefixes = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p4de.", "p5.")
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(gpu_prefixes) for t in workers)
    assert "2.58.0" in cfg["docker"]["image"]
    assert any("--head" in c for c in cfg["head_start_ray_commands"])
    assert any("RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])
    mounts = " ".join(cfg["docker"].get("run_options", []))
    assert "/mnt/data" in mounts and "/mnt/runs" in mounts
    excluded = " ".join(cfg.get("rsync_exclude", []))
    for must in (".git", ".venv", "data", "runs"):
        assert must in excluded, f"rsync_exclude lacks {must}"
    try:  # Ray's own launcher schema, when the installed Ray ships it
        import jsonschema
        import ray.autoscaler
    except Exception:
        return
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    if schema_path.exists():
        jsonschema.validate(cfg, json.loads(schema_path.read_text()))


# --------------------------------------------------------------------------- script / docs


def test_submit_script_is_strict_and_executable():
    script = CLUSTER / "submit_examples.sh"
    text = script.read_text()
    assert script.stat().st_mode & stat.S_IXUSR, "cluster/submit_examples.sh is not executable"
    assert text.startswith("#!")
    assert "set -euo pipefail" in text
    assert not re.search(r"^\s*(export\s+)?RAY_ADDRESS=", text, flags=re.M), \
        "take RAY_ADDRESS from the environment, do not hard-code it"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # with no argument it lists the examples and exits 2 without needing a cluster
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    listing = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert listing.returncode == 2 and "train4" in listing.stderr, listing


def test_submit_script_covers_2_4_8_workers_resume_eval_tune():
    argvs = [argv for src, argv in VPN_COMMANDS if src.endswith("submit_examples.sh")]
    workers = {argv[argv.index("--workers") + 1] for argv in argvs
               if argv[1] == "train" and "--workers" in argv}
    assert {"2", "4", "8"} <= workers, workers
    assert any(argv[1] == "train" and "--resume" in argv for argv in argvs)
    assert any(argv[1] == "eval" for argv in argvs)
    assert any(argv[1] == "tune" for argv in argvs)


def test_readme_covers_the_essentials():
    text = (CLUSTER / "README.md").read_text()
    for must in ("--out", "/mnt/data", "vpn-dist prep", "tensorboard --logdir", "--resume",
                 "train.max_failures", "vpn-dist tune", "results.csv", "results.md",
                 "best_config.yaml", "ray job submit", "kubectl apply", "ray up"):
        assert must in text, f"cluster/README.md does not mention {must!r}"


# --------------------------------------------------------------------------- commands


def test_commands_were_found():
    subcommands = {argv[1] if len(argv) > 1 else "" for _, argv in VPN_COMMANDS}
    assert "train" in subcommands, VPN_COMMANDS
    assert "tune" in subcommands, VPN_COMMANDS
    sources = {src for src, _ in VPN_COMMANDS}
    for must in ("cluster/kuberay/rayjob.yaml", "cluster/submit_examples.sh", "cluster/README.md", "README.md",
                 "docs/data.md", "docs/training.md", "docs/config.md", "docs/sweeps.md", "docs/reproduction.md",
                 "docs/benchmarks.md", "docs/cluster.md"):
        assert must in sources, f"no vpn-dist command found in {must}"


@pytest.mark.parametrize(
    "source,argv", VPN_COMMANDS,
    ids=[f"{src}:{' '.join(argv[:2])}#{i}" for i, (src, argv) in enumerate(VPN_COMMANDS)],
)
def test_vpn_dist_command_parses(source, argv):
    check_vpn_command(argv, where=source)


def test_wrong_flags_are_rejected():
    """The checker must catch what a typo in the docs would be."""
    good = shlex.split("vpn-dist train --data /mnt/data/cifar10 --base resnet18 --generator resnet18 "
                       "--mode joint --epochs 1 --out /mnt/runs/x --workers 2 --gpu")
    check_vpn_command(good)
    for bad in (good + ["--no-such-flag"],
                good + ["--worker", "4"],                 # abbreviation of --workers
                [*good[:2], "--dataset", *good[3:]],      # wrong flag name
                ["vpn-dist", "trian", *good[2:]],         # wrong subcommand
                good + ["--set", "train.no_such_key=1"],  # unknown config key
                good + ["--set", "train.epochs=many"]):   # value of the wrong type
        with pytest.raises(pytest.fail.Exception):
            check_vpn_command(bad)


def test_extraction_handles_continuations_and_operators():
    text = ("x && vpn-dist tune --space smoke \\\n   --data /d --out /o; echo done\n"
            "# vpn-dist not-a-command in a comment\n")
    assert _commands_in_text(text) == [["vpn-dist", "tune", "--space", "smoke", "--data", "/d", "--out", "/o"]]


# --------------------------------------------------------------------------- ray job submit


RAY_SUBMITS = [(src, argv) for src, argv in _all_commands("ray")
               if argv[1:3] == ["job", "submit"]]


def _check_ray_submit(argv: list[str], where: str):
    click = pytest.importorskip("click")
    try:
        from ray.dashboard.modules.job.cli import submit
    except Exception as err:
        pytest.skip(f"ray job CLI not importable: {err!r}")
    try:
        ctx = submit.make_context("submit", argv[3:])
    except click.UsageError as err:
        pytest.fail(f"{where}: invalid `ray job submit` options ({err}):\n  {shlex.join(argv)}")
    entry = list(ctx.params["entrypoint"])
    assert entry and entry[0] == "vpn-dist", f"{where}: entrypoint is not a vpn-dist command: {entry}"
    rt = ctx.params.get("runtime_env")
    if rt:
        assert (REPO / rt).is_file(), f"{where}: --runtime-env {rt} does not exist"


@pytest.mark.parametrize("source,argv", RAY_SUBMITS,
                         ids=[f"{s}#{i}" for i, (s, _) in enumerate(RAY_SUBMITS)])
def test_ray_job_submit_options(source, argv):
    _check_ray_submit(argv, source)


def test_ray_job_submit_checker_rejects_typos():
    pytest.importorskip("ray.dashboard.modules.job.cli")
    with pytest.raises(pytest.fail.Exception):
        _check_ray_submit(shlex.split("ray job submit --working-dirr . -- vpn-dist eval --run r"), "<test>")


# --------------------------------------------------------------------------- ray start


RAY_STARTS = [(src, argv) for src, argv in _all_commands("ray") if argv[1:2] == ["start"]]


def _check_ray_start(argv: list[str], where: str):
    click = pytest.importorskip("click")
    from ray.scripts.scripts import start

    try:
        start.make_context("start", argv[2:])
    except click.UsageError as err:
        pytest.fail(f"{where}: invalid `ray start` options ({err}):\n  {shlex.join(argv)}")


def test_ray_start_commands_were_found():
    sources = {src for src, _ in RAY_STARTS}
    assert "cluster/README.md" in sources, sources  # the head and the node that joins it
    assert any("--head" in argv for _, argv in RAY_STARTS) and any("--address" in argv for _, argv in RAY_STARTS)


@pytest.mark.parametrize("source,argv", RAY_STARTS, ids=[f"{s}#{i}" for i, (s, _) in enumerate(RAY_STARTS)])
def test_ray_start_options(source, argv):
    _check_ray_start(argv, source)


def test_ray_start_checker_rejects_typos():
    with pytest.raises(pytest.fail.Exception):
        _check_ray_start(shlex.split("ray start --adress 10.0.3.2:6379"), "<test>")
