"""deploy/*.yaml: Ray's own cluster-launcher validation, plus the role invariants csil relies on.

What `ray up` does with a config before it touches a cloud (ray/autoscaler/_private/commands.py,
``_bootstrap_config``): ``prepare_config`` (merge the provider's defaults.yaml, merge setup commands, fill per-type
min/max workers; for the local provider, build its single node type) and ``validate_config`` (ray-schema.json and
the cross-field checks). The two steps in between are skipped here because they call AWS (boto3):
``fillout_available_node_types_resources`` and the provider's ``bootstrap_config``. The autoscaler on the head
reads the config through ``AutoscalingConfig`` (autoscaler v2, the default since Ray 2.50); it resolves each
worker type's setup commands, so the test asks it rather than re-implementing Ray's precedence rules.

No network, no credentials, no cluster: only config parsing and a few stubbed shell runs.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from ray.autoscaler._private.command_runner import _with_interactive
from ray.autoscaler._private.util import prepare_config, validate_config, with_head_node_ip
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "deploy" / "cluster.yaml"
ONPREM = ROOT / "deploy" / "cluster-onprem.yaml"
ROLES = ("csil_learner", "csil_actor", "csil_inference")
# `pip install -e .` / `-e '.[gpu]'` of our checkout (plain pip or uv pip), in the directory file_mounts fills
INSTALL = re.compile(r"cd ~/csil && \S*(?:uv pip|pip) install (?:--python \S+ )?(?:--no-deps )?-e (\.|'\.\[gpu\]')(?:\s|\)|$)")


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _prepared(path: Path) -> dict:
    """The config as `ray up` validates it (prepare_config, then validate_config)."""
    config = prepare_config(copy.deepcopy(_load(path)))
    validate_config(config)
    return config


def _installs(commands: list[str]) -> set[str]:
    """Which installs of our package a node's setup commands run: '.' (CPU) and/or '.[gpu]'."""
    return {m.group(1).strip("'") for cmd in commands for m in INSTALL.finditer(cmd)}


# --- Ray's validation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [AWS, ONPREM], ids=["aws", "onprem"])
def test_ray_validates_config(path, tmp_path):
    raw = _load(path)
    validate_config(copy.deepcopy(raw))  # the file as written already satisfies the schema
    config = _prepared(path)
    # the autoscaler's own view of the same file (this is what the head's monitor builds). It hashes the SSH key
    # file into each node type's launch hash, so point an on-prem key at a stand-in file.
    raw = copy.deepcopy(raw)
    if "ssh_private_key" in raw.get("auth", {}):
        (tmp_path / "key").write_text("not a key\n")
        raw["auth"]["ssh_private_key"] = str(tmp_path / "key")
    autoscaling = AutoscalingConfig(raw, skip_content_hash=True)
    assert autoscaling.get_head_node_type() == config["head_node_type"]
    assert set(autoscaling.get_node_type_configs()) == set(config["available_node_types"])


@pytest.mark.parametrize("path", [AWS, ONPREM], ids=["aws", "onprem"])
def test_every_command_is_valid_bash(path):
    config = _prepared(path)
    commands = [c for key in ("initialization_commands", "head_setup_commands", "worker_setup_commands",
                              "head_start_ray_commands", "worker_start_ray_commands") for c in config[key]]
    commands += [c for t in config["available_node_types"].values() for c in t.get("worker_setup_commands", [])]
    for cmd in commands:
        # Ray runs each command as `bash --login -c -i '<its wrapper> && (cmd)'`: check that exact string parses
        wrapped = _with_interactive(cmd)[-1]
        result = subprocess.run(["bash", "-n", "-c", shlex.split(wrapped)[0]], capture_output=True, text=True)
        assert result.returncode == 0, f"{path.name}: bash cannot parse {cmd!r}: {result.stderr}"


@pytest.mark.parametrize("path", [AWS, ONPREM], ids=["aws", "onprem"])
def test_file_mounts_carry_the_installable_package(path):
    config = _prepared(path)
    mounts = config["file_mounts"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = ["pyproject.toml", pyproject["project"]["readme"], *packages]
    for name in needed:
        assert mounts.get(f"~/csil/{name}") == f"./{name}", f"{path.name}: file_mounts must carry {name}"
    for local in mounts.values():  # relative to the repository root, where README says to run `ray up`
        assert (ROOT / local).exists(), f"{path.name}: file_mounts source {local} does not exist"
    assert "./.venv" not in mounts.values() and "." not in mounts.values()


# --- AWS: roles are node types ------------------------------------------------------------------------------

def test_aws_roles():
    config = _prepared(AWS)
    assert config["provider"]["type"] == "aws" and config["provider"]["region"] == "us-west-2"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}

    assert head["resources"].get("csil_learner", 0) >= 1 and head["resources"].get("GPU", 0) >= 1
    assert head["max_workers"] == 0
    # each role is advertised by exactly one node type, so placement by role is unambiguous
    for role in ROLES:
        owners = [name for name, t in types.items() if t["resources"].get(role, 0) > 0]
        assert len(owners) == 1, f"{role} advertised by {owners}"
    actors = [t for t in workers.values() if t["resources"].get("csil_actor", 0) > 0]
    inference = [t for t in workers.values() if t["resources"].get("csil_inference", 0) > 0]
    assert actors and inference
    for t in actors:  # one env actor per unit needs a CPU each
        assert t["resources"]["CPU"] >= t["resources"]["csil_actor"] and t["resources"].get("GPU", 0) == 0
    for t in inference:  # one Serve replica per GPU
        assert 1 <= t["resources"]["csil_inference"] <= t["resources"]["GPU"]
    for t in workers.values():
        assert t["max_workers"] >= 1 and (t["min_workers"] == 0 or t in actors)
    # role_resources() pins actors only when csil_actor is already advertised: keep an actor node up
    assert all(t["min_workers"] >= 1 for t in actors)
    # every worker type can actually reach its own max_workers
    assert config["max_workers"] >= sum(t["max_workers"] for t in workers.values())


def test_aws_setup_installs_the_package_on_every_node_type():
    config = _prepared(AWS)
    autoscaling = AutoscalingConfig(_load(AWS), skip_content_hash=True)
    head_type = config["head_node_type"]
    for name, node_type in config["available_node_types"].items():
        # the head runs setup_commands + head_setup_commands; a worker type, what Ray resolves for that type
        commands = config["head_setup_commands"] if name == head_type else autoscaling.get_worker_setup_commands(name)
        installs = _installs(commands)
        assert installs, f"{name}: setup does not install the package"
        if node_type["resources"].get("csil_inference"):
            # openpi's own venv gets our code without our (conflicting) dependencies
            assert any("--no-deps -e ." in c and "openpi/.venv" in c for c in commands), name
            assert any("uv sync" in c for c in commands) and any("ray[default,serve]==2.60.0" in c for c in commands)
        elif node_type["resources"].get("GPU"):
            assert ".[gpu]" in installs, f"{name}: a GPU node needs jax[cuda12]"
        else:
            assert installs == {"."}, f"{name}: a CPU node installs the plain package"
        assert any("~/.csil_ray_env" in c for c in commands), f"{name}: does not name the venv Ray runs in"
    # the head's autoscaler launches EC2 nodes with boto3
    assert any("boto3" in c for c in config["head_setup_commands"])


def test_aws_start_commands_do_not_contradict_node_types():
    config = _prepared(AWS)
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    for cmds in (head, worker):
        # the AWS provider passes each node type's `resources:` to `ray start` (RAY_OVERRIDE_RESOURCES);
        # a flag here would be a second, possibly different, answer
        for flag in ("--resources", "--num-cpus", "--num-gpus"):
            assert flag not in cmds
        assert "--metrics-export-port=8080" in cmds
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker


# --- on-prem: one node type, roles on the ray start lines -----------------------------------------------------

def test_onprem_single_node_type_and_head_role():
    raw = _load(ONPREM)
    config = _prepared(ONPREM)
    assert config["provider"]["type"] == "local" and "available_node_types" not in raw
    (name, node_type), = config["available_node_types"].items()
    n = len(raw["provider"]["worker_ips"])
    assert node_type["min_workers"] == node_type["max_workers"] == n >= 1

    head = " ".join(config["head_start_ray_commands"])
    resources = json.loads(re.search(r"--resources='([^']*)'", head).group(1))
    assert resources.get("csil_learner", 0) >= 1
    assert "--metrics-export-port=8080" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert _installs(config["head_setup_commands"]) == {".[gpu]"}
    # workers: one list, a GPU branch (openpi's venv, no deps) and a CPU branch (the plain package)
    (branches,) = [c for c in config["worker_setup_commands"] if c.startswith("if nvidia-smi")]
    assert _installs([branches]) == {"."} and "--no-deps -e ." in branches and "uv sync" in branches


def _run_worker_start(tmp_path: Path, *, gpus: int | None, override: str | None = None) -> dict:
    """Run the on-prem worker start commands the way Ray's SSH runner does, with `ray` and `nvidia-smi` stubbed;
    return the --resources dict `ray start` received."""
    home = tmp_path / "home"
    stubs = tmp_path / "stubs"
    home.mkdir(parents=True)
    stubs.mkdir(parents=True)
    (stubs / "ray").write_text('#!/bin/sh\nprintf "%s\\n" "$@" >> "$HOME/ray_calls"\necho --- >> "$HOME/ray_calls"\n')
    if gpus is None:
        smi = "#!/bin/sh\nexit 9\n"  # no driver: nvidia-smi fails
    else:  # a MIG line must not count as a GPU
        lines = "".join(f'echo "GPU {i}: NVIDIA A100-SXM4-40GB (UUID: GPU-{i})"\n' for i in range(gpus))
        smi = f"#!/bin/sh\n{lines}echo '  MIG 1g.5gb Device 0: (UUID: MIG-0)'\n"
    (stubs / "nvidia-smi").write_text(smi)
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    # Ray sources ~/.bashrc before every command (that is also where the real venv hook lives)
    (home / ".bashrc").write_text(f'export PATH="{stubs}:$PATH"\n')
    if override is not None:
        (home / ".csil_ray_resources").write_text(override)

    config = _prepared(ONPREM)
    for cmd in with_head_node_ip(config["worker_start_ray_commands"], "10.0.0.1"):
        # the SSH runner sends this argv joined into one line, which the remote login shell parses
        subprocess.run(" ".join(_with_interactive(cmd)), shell=True, env={"HOME": str(home), "PATH": os.environ["PATH"]},
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                       start_new_session=True, check=True)
    calls = [c.split("\n") for c in (home / "ray_calls").read_text().split("---\n") if c]
    assert calls[0][0] == "stop"
    start = calls[-1]
    assert start[0] == "start" and "--address=10.0.0.1:6379" in start and "--metrics-export-port=8080" in start
    (res,) = [a for a in start if a.startswith("--resources=")]
    return json.loads(res.removeprefix("--resources="))


def test_onprem_worker_roles_from_hardware(tmp_path):
    # CPU machine: one csil_actor per CPU (despite the OMP_NUM_THREADS=1 that Ray exports before every command)
    assert _run_worker_start(tmp_path / "cpu", gpus=None) == {"csil_actor": len(os.sched_getaffinity(0))}
    # GPU machine: an inference machine, one csil_inference per GPU
    assert _run_worker_start(tmp_path / "gpu", gpus=2) == {"csil_inference": 2}
    # an explicit per-machine file wins
    assert _run_worker_start(tmp_path / "file", gpus=2, override='{"csil_actor": 4}') == {"csil_actor": 4}
