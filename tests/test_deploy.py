"""The deployment files agree with the gateway they deploy: the Dockerfile (its
install steps run for real in a fresh virtual environment), the systemd unit
(systemd-analyze) and the Kubernetes manifests, whose ports, probes, GATEWAY_*
variables and mounted secret files are checked against the config model."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel, ValidationError

import gateway
from gateway.cli import EXIT_CONFIG, build_parser
from gateway.config import GatewayConfig
from gateway.metrics import COMMIT_ENV

from .conftest import REPO

DEPLOY = REPO / "deploy"
ENV_PREFIX = "GATEWAY_"
ENV_NESTED = "__"
PROBE_PATHS = {"/healthz", "/readyz"}  # all the probe listener serves


# ------------------------------------------------------ GATEWAY_* variables


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def config_key(name: str) -> tuple[str, ...]:
    """The config key a GATEWAY_<SECTION>__<KEY> variable sets (sections
    joined by `__`, upper case), checked against GatewayConfig's fields."""
    assert name.startswith(ENV_PREFIX) and name == name.upper(), name
    parts = tuple(name[len(ENV_PREFIX) :].lower().split(ENV_NESTED))
    model: type[BaseModel] = GatewayConfig
    for i, part in enumerate(parts):
        fields = {(f.alias or n): f for n, f in model.model_fields.items()}
        assert part in fields, f"{name}: no key {part!r} in {model.__name__}"
        annotation = fields[part].annotation
        if i < len(parts) - 1:
            assert _is_section(annotation), f"{name}: {part!r} is not a section"
            model = annotation
        else:
            assert not _is_section(annotation), f"{name}: {part!r} is a whole section"
    return parts


def with_environment(base: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Config file values overridden by GATEWAY_* variables (lists as JSON)."""
    data = copy.deepcopy(dict(base))
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        *sections, key = config_key(name)
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = json.loads(value) if value.lstrip().startswith(("[", "{")) else value
    return data


def effective_config(base: Mapping[str, Any], environ: Mapping[str, str]) -> GatewayConfig:
    return GatewayConfig.model_validate(with_environment(base, environ))


def test_config_key_follows_the_naming_scheme() -> None:
    assert config_key("GATEWAY_CONTROL__PROBE_LISTEN") == ("control", "probe_listen")
    assert config_key("GATEWAY_REQUIRE_INITIALIZED_STATE") == ("require_initialized_state",)
    assert config_key("GATEWAY_LOGGING__JSON") == ("logging", "json")
    for wrong in (
        "GATEWAY_CONTROL_PROBE_LISTEN",  # one underscore: no such top-level key
        "GATEWAY_CONTROL__PROBE",
        "GATEWAY_CONTROL",
        "GATEWAY_control__listen",
        "GATEWAY_REQUIRE_INITIALIZED_STATE__X",
    ):
        with pytest.raises(AssertionError):
            config_key(wrong)


def host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------- Dockerfile


@dataclass(frozen=True)
class Instruction:
    stage: str
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), self
        return [str(v) for v in value]

    def words(self) -> list[str]:
        return shlex.split(self.args)


def dockerfile() -> list[Instruction]:
    text = (REPO / "Dockerfile").read_text()
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stage, out = "", []
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            stage = args.split()[-1] if " AS " in args.upper() else args
        out.append(Instruction(stage, keyword, args))
    return out


def stage(name: str) -> list[Instruction]:
    found = [i for i in dockerfile() if i.stage == name and i.keyword != "FROM"]
    assert found, f"no stage {name}"
    return found


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for word in ins.words():
                key, _, value = word.partition("=")
                env[key] = value
    return env


def copies(instructions: list[Instruction]) -> list[tuple[str | None, list[str], str]]:
    """(from stage or None, sources, destination) of every COPY."""
    out = []
    for ins in instructions:
        if ins.keyword == "COPY":
            words = ins.words()
            options = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            source_stage = next(
                (o.partition("=")[2] for o in options if o.startswith("--from=")), None
            )
            out.append((source_stage, paths[:-1], paths[-1]))
    return out


def dockerignored(path: str) -> bool:
    patterns = [
        p.strip()
        for p in (REPO / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, p) or fnmatch.fnmatch(prefix, p.removeprefix("**/"))
        for prefix in prefixes
        for p in patterns
    )


RUNTIME_CONFIG = REPO / "config" / "gateway.toml"  # what the image runs on, with its ENV


def image_config_data() -> dict[str, Any]:
    return tomllib.loads(RUNTIME_CONFIG.read_text())


def image_env() -> dict[str, str]:
    return env_of(stage("runtime"))


def test_dockerfile_copies_only_files_of_the_repository_and_no_dev_code() -> None:
    for source_stage, sources, _ in copies(dockerfile()):
        if source_stage is not None:
            continue
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
            top = PurePosixPath(source).parts[0]
            assert top not in {"sim", "bench", "tests", "docs", "proto", ".ci"}, source
    runtime = stage("runtime")
    for source_stage, sources, _ in copies(runtime):
        assert source_stage == "build" or all(s.startswith("config/") for s in sources)
    assert not [i for i in runtime if i.keyword == "RUN" and "pip" in i.args]


def test_dockerfile_installs_dependencies_in_their_own_layer_before_the_source() -> None:
    build = stage("build")
    runs = [i for i in build if i.keyword == "RUN"]
    assert [r.words()[:3] for r in runs] == [
        ["sh", "install-runtime.sh", "deps"],
        ["sh", "install-runtime.sh", "project"],
        ["command", "-v", "cc"],  # a C compiler, for this stage only
        ["sh", "install-runtime.sh", "compile"],  # the per-message path (mypyc)
    ]
    deps_at = build.index(runs[0])
    before = [c for c in copies(build[:deps_at])]
    assert before == [(None, ["pyproject.toml", "scripts/install-runtime.sh"], "./")]
    source_at = min(
        build.index(i) for i in build if i.keyword == "COPY" and "gateway" in i.words()[0]
    )
    assert deps_at < source_at


def test_dockerfile_runtime_is_non_root_with_probe_healthcheck_ports_and_state_volume() -> None:
    runtime = stage("runtime")
    by_keyword = {i.keyword: i for i in runtime}  # the last of each
    user = by_keyword["USER"].args
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) >= 1000, user

    env = image_env()
    args = build_parser().parse_args(by_keyword["CMD"].exec_form())
    assert args.command == "run" and args.json_logs
    data = with_environment(image_config_data(), env)
    # `init` and other commands load the configuration with the image's ENV alone.
    assert GatewayConfig.model_validate(data).require_initialized_state is True
    data["control"] = {**data.get("control", {}), "listen": args.control_listen}  # run's flag
    with pytest.raises(ValidationError, match="not a loopback address"):
        effective_config(data, {})  # no TLS and no explicit opt-out: refused
    config = effective_config(data, {"GATEWAY_CONTROL__ALLOW_PLAINTEXT": "true"})
    tls = {
        "GATEWAY_CONTROL__TLS_CERT": "/run/secrets/tls.crt",
        "GATEWAY_CONTROL__TLS_KEY": "/run/secrets/tls.key",
    }
    assert effective_config(data, tls).control.tls_key is not None
    control_host, control_port = host_port(config.control.listen)
    probe_host, probe_port = host_port(config.control.probe_listen)
    assert control_host == probe_host == "0.0.0.0"
    exposed = {int(p.split("/")[0]) for i in runtime if i.keyword == "EXPOSE" for p in i.words()}
    assert exposed == {control_port, probe_port}

    check = by_keyword["HEALTHCHECK"].args
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    url = urlsplit(re.search(r"'(http://[^']+)'", command[2]).group(1))  # type: ignore[union-attr]
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", probe_port, "/healthz")

    entrypoint = by_keyword["ENTRYPOINT"].exec_form()
    assert entrypoint == ["python", "-m", "gateway"]
    assert env["PATH"].startswith("/opt/privacy-gateway/bin:")
    assert ("build", ["/opt/privacy-gateway"], "/opt/privacy-gateway") in copies(runtime)
    volumes = json.loads(by_keyword["VOLUME"].args)
    assert str(args.state_dir) in volumes
    copied = {
        str(PurePosixPath(dest) / PurePosixPath(s).name)
        for _, sources, dest in copies(runtime)
        for s in sources
    }
    assert str(args.config) in copied and "/app/config/policy.yaml" in copied
    assert image_config_data()["policy"] == "policy.yaml"  # next to it
    assert env[COMMIT_ENV] == "${COMMIT}"
    assert any(i.keyword == "ARG" and i.args.startswith("COMMIT") for i in runtime)


def _run_build_stage(src: Path, venv: Path) -> None:
    """The build stage's COPY and RUN steps, in `src` instead of /src and
    with `venv` instead of /opt/privacy-gateway."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ["PYTHON"] = sys.executable  # the image's python3, with pip
    for ins in stage("build"):
        if ins.keyword == "WORKDIR":
            assert ins.args == "/src"
        elif ins.keyword == "COPY":
            ((_, sources, dest),) = copies([ins])
            for source in sources:
                target = src / dest
                if dest.endswith("/"):
                    target = target / Path(source).name
                if (REPO / source).is_dir():
                    shutil.copytree(
                        REPO / source,
                        target,
                        # As .dockerignore: the checkout's own compiled core stays out.
                        ignore=shutil.ignore_patterns("__pycache__", "_compiled"),
                    )
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / source, target)
        elif ins.keyword == "RUN":
            command = ins.args.replace("/opt/privacy-gateway", str(venv))
            result = subprocess.run(
                ["sh", "-c", command],
                cwd=src,
                env=environ,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert result.returncode == 0, f"RUN {ins.args}\n{result.stdout}\n{result.stderr}"


CHECK_RUNTIME = """
import importlib, importlib.util, pkgutil, sys
from importlib import metadata
import gateway, telematics
assert gateway.__file__.startswith(sys.prefix), gateway.__file__
for package in (gateway, telematics):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith(".__main__"):
            importlib.import_module(module.name)
absent = ["sim", "bench", "tests", "pytest", "hypothesis", "grpc_tools", "mypy", "ruff", "pip"]
present = [name for name in absent if importlib.util.find_spec(name) is not None]
assert not present, present
import gateway.core, gateway.edges  # the build stage compiled them for this interpreter
assert gateway.core.COMPILED and gateway.edges.COMPILED
for name in ("gateway.core.decide", "gateway.edges.mqtt_codec"):
    assert sys.modules[name].__file__.startswith(sys.prefix), name
    assert sys.modules[name].__file__.endswith(".so"), name
print(metadata.version("vehicle-privacy-gateway"))
"""


def test_dockerfile_install_steps_give_a_complete_runtime_without_dev_tools(
    tmp_path: Path,
) -> None:
    """Runs the build stage's steps for real (pip, from the package index) and
    then the installed gateway, from outside the source tree."""
    src, venv, state = tmp_path / "src", tmp_path / "venv", tmp_path / "state"
    src.mkdir()
    _run_build_stage(src, venv)
    python = str(venv / "bin" / "python")
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120
        )

    checked = run(python, "-c", CHECK_RUNTIME)
    assert checked.returncode == 0, checked.stderr
    version = gateway.__version__  # pyproject takes its version from the package
    assert checked.stdout.strip() == version
    policy = run(python, "-m", "gateway", "check-policy", str(REPO / "config" / "policy.yaml"))
    assert policy.returncode == 0, policy.stderr
    init = run(
        python, "-m", "gateway", "init", "--config", str(RUNTIME_CONFIG), "--state-dir", str(state)
    )
    assert init.returncode == 0, init.stderr
    assert (state / "instance.id").exists()
    assert not list(venv.glob("lib/python*/site-packages/pip"))


# ------------------------------------------------------------------ systemd

UNIT = DEPLOY / "systemd" / "privacy-gateway.service"
UNIT_PREFIX = "/opt/privacy-gateway"


def unit_directives() -> dict[str, list[str]]:
    """Section.Key -> values (keys may repeat), continuation lines joined."""
    directives: dict[str, list[str]] = {}
    section, pending = "", ""
    for raw in UNIT.read_text().splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return directives


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "": 1}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert match and match.group(2) in units, value
    return float(match.group(1)) * units[match.group(2)]


def test_systemd_unit_is_hardened_restarts_quickly_and_agrees_with_the_gateway() -> None:
    d = unit_directives()
    one = {key: values[-1] for key, values in d.items()}
    for key, value in {
        "Service.DynamicUser": "yes",
        "Service.ProtectSystem": "strict",
        "Service.NoNewPrivileges": "yes",
        "Service.PrivateTmp": "yes",
        "Service.StateDirectory": "privacy-gateway",
        "Service.StateDirectoryMode": "0700",
        "Service.Restart": "on-failure",
        "Service.RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "Service.CapabilityBoundingSet": "",
    }.items():
        assert one.get(key) == value, key
    assert "@system-service" in d["Service.SystemCallFilter"]
    assert seconds(one["Service.RestartSec"]) <= 5
    # Refused configuration or state: restarting would not help.
    assert one["Service.RestartPreventExitStatus"] == str(EXIT_CONFIG)
    assert shlex.split(one["Service.ExecReload"])[1:] == ["-HUP", "$MAINPID"]
    assert seconds(one["Service.TimeoutStopSec"]) > GatewayConfig().pipeline.drain_timeout_s

    argv = shlex.split(one["Service.ExecStart"])
    assert argv[0] == f"{UNIT_PREFIX}/bin/privacy-gateway"  # the project's console script
    assert (
        "privacy-gateway"
        in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    )
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    assert str(args.state_dir) == f"/var/lib/{one['Service.StateDirectory']}"

    credentials = dict(c.split(":", 1) for c in d["Service.LoadCredential"])
    environ = dict(
        word.split("=", 1) for value in d["Service.Environment"] for word in shlex.split(value)
    )
    used = {v.removeprefix("%d/") for v in environ.values() if v.startswith("%d/")}
    assert used and used <= set(credentials), "a %d/ path names no LoadCredential"
    for source in credentials.values():
        assert source.startswith("/etc/privacy-gateway/credentials/"), source
    resolved = {k: v.replace("%d", "/run/credentials/x.service") for k, v in environ.items()}
    config = effective_config(image_config_data(), resolved)
    assert str(config.key_path).startswith("/run/credentials/")


def test_systemd_analyze_verifies_the_unit_and_rates_it_ok(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (part of systemd; not a project dependency)")
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    stub = prefix / "bin" / "privacy-gateway"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp_path / UNIT.name  # the unit as installed, the prefix where this test put it
    unit.write_text(UNIT.read_text().replace(UNIT_PREFIX, str(prefix)))
    verify = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    complaints = [
        line for line in (verify.stdout + verify.stderr).splitlines() if unit.name in line
    ]
    assert verify.returncode == 0 and not complaints, verify.stdout + verify.stderr
    # Exposure 2.0 or lower ("OK" on systemd-analyze's 0-10 scale; the threshold is x10).
    security = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr


# --------------------------------------------------------------- Kubernetes

K8S = DEPLOY / "kubernetes"


def manifests() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def under(path: str, mount: str) -> str | None:
    """`path` relative to `mount`, None when it is not inside it."""
    p, m = PurePosixPath(path), PurePosixPath(mount)
    return str(p.relative_to(m)) if p.is_relative_to(m) else None


@dataclass
class Container:
    spec: dict[str, Any]
    volumes: dict[str, dict[str, Any]]

    @property
    def environ(self) -> dict[str, str]:
        return {e["name"]: str(e["value"]) for e in self.spec.get("env", [])}

    def mounts(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for mount in self.spec.get("volumeMounts", []):
            yield mount["mountPath"], self.volumes[mount["name"]]

    def source_of(self, path: str) -> tuple[str, dict[str, Any], str]:
        """(volume name, volume, path inside it) of a file the container reads."""
        found = [
            (volume["name"], volume, rel)
            for mount, volume in self.mounts()
            if (rel := under(path, mount)) is not None
        ]
        assert len(found) == 1, f"{path}: in {len(found)} mounts"
        return found[0]

    def secret_file(self, path: str) -> tuple[str, str]:
        """(secret name, key) a mounted secret file comes from."""
        name, volume, rel = self.source_of(path)
        assert "secret" in volume, f"{path}: volume {name} is not a secret"
        items = {i["path"]: i["key"] for i in volume["secret"]["items"]}
        assert rel in items, f"{path}: {rel} is not an item of secret volume {name}"
        return volume["secret"]["secretName"], items[rel]


def pod() -> tuple[dict[str, Any], Container, Container]:
    spec = manifests()["StatefulSet"]["spec"]["template"]["spec"]
    claims = manifests()["StatefulSet"]["spec"]["volumeClaimTemplates"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for claim in claims:
        volumes[claim["metadata"]["name"]] = {"name": claim["metadata"]["name"], "claim": claim}
    (init,) = spec["initContainers"]
    (main,) = spec["containers"]
    return spec, Container(init, volumes), Container(main, volumes)


def k8s_config_data() -> dict[str, Any]:
    return tomllib.loads((K8S / "gateway.toml").read_text())


def test_kubernetes_objects_select_the_same_pods() -> None:
    docs = manifests()
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {(K8S / r).exists() for r in kustomization["resources"]} == {True}
    statefulset, service, budget = docs["StatefulSet"], docs["Service"], docs["PodDisruptionBudget"]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert budget["apiVersion"] == "policy/v1" and "maxUnavailable" in budget["spec"]
    assert statefulset["spec"]["replicas"] == 1  # every instance reads all of vehicle/#


def test_kubernetes_ports_probes_and_variables_agree_with_the_config_model() -> None:
    spec, init, main = pod()
    environ = {**image_env(), **main.environ}  # the image's ENV, then the manifest's
    config = effective_config(k8s_config_data(), environ)  # names and values validated
    assert config.require_initialized_state
    assert config.control.tls_cert is not None and not config.control.allow_plaintext
    ports = {p["name"]: p["containerPort"] for p in main.spec["ports"]}
    assert host_port(config.control.listen) == ("0.0.0.0", ports["control"])
    assert host_port(config.control.probe_listen) == ("0.0.0.0", ports["probe"])
    probes = {
        kind: main.spec[kind]["httpGet"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    for kind, probe in probes.items():
        port = probe["port"]
        assert port in ("probe", ports["probe"]), f"{kind} must use the probe listener"
        assert probe["path"] in PROBE_PATHS, kind
    assert probes["livenessProbe"]["path"] == "/healthz"  # an outage is not a restart
    assert probes["readinessProbe"]["path"] == "/readyz"
    service_ports = {p["targetPort"] for p in manifests()["Service"]["spec"]["ports"]}
    assert service_ports <= set(ports) | set(ports.values())
    assert spec["terminationGracePeriodSeconds"] > config.pipeline.drain_timeout_s
    for name in init.environ:
        config_key(name)


def test_kubernetes_mounted_secrets_and_state_agree_with_the_config_model() -> None:
    _, init, main = pod()
    environ = {**image_env(), **main.environ}
    config = effective_config(k8s_config_data(), environ)
    init_config = effective_config(k8s_config_data(), {**image_env(), **init.environ})

    run_args = build_parser().parse_args(main.spec["args"])
    init_args = build_parser().parse_args(init.spec["args"])
    assert (run_args.command, init_args.command) == ("run", "init")
    assert run_args.config == init_args.config and run_args.state_dir == init_args.state_dir
    # The config file is the secret's gateway.toml; the state is on the claim.
    assert main.secret_file(str(run_args.config)) == ("privacy-gateway-config", "gateway.toml")
    _, volume, rel = main.source_of(str(run_args.state_dir))
    assert "claim" in volume and rel != "."  # a directory of its own: made 0700 by init
    # init binds the store to the key the gateway will use.
    assert init_config.key_path == config.key_path
    assert main.secret_file(str(config.key_path)) == init.secret_file(str(init_config.key_path))

    files = {
        "keys.pseudonym_key_file": config.key_path,
        "control.tls_cert": config.control.tls_cert,
        "control.tls_key": config.control.tls_key,
    }
    used: set[tuple[str, str]] = {("privacy-gateway-config", "gateway.toml")}
    for what, path in files.items():
        assert path is not None and path.is_absolute(), what
        used.add(main.secret_file(str(path)))
    assert main.secret_file(str(config.key_path)) == ("privacy-gateway-keys", "pseudonym.key")
    mounted = {
        (v["secret"]["secretName"], item["key"])
        for _, v in main.mounts()
        if "secret" in v
        for item in v["secret"]["items"]
    }
    assert mounted == used, "a secret file is mounted that no setting reads, or the reverse"
    assert str(config.policy) == "/app/config/policy.yaml"  # shipped in the image


def test_kubernetes_pod_runs_as_the_image_user_read_only() -> None:
    spec, init, main = pod()
    context = spec["securityContext"]
    user = next(i.args for i in stage("runtime") if i.keyword == "USER")
    assert context["runAsNonRoot"] is True
    assert f"{context['runAsUser']}:{context['runAsGroup']}" == user
    assert spec["automountServiceAccountToken"] is False
    for container in (init, main):
        security = container.spec["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container.spec["image"] == "privacy-gateway"  # kustomization sets the registry


def test_kubernetes_shared_overlay_runs_instances_of_one_group_on_postgresql() -> None:
    """deploy/kubernetes/shared: more replicas of one group, each pod's name
    its instance id, init and gateway opening the store as the same instance
    of the same group (otherwise init would be refused while the others run),
    the database password from a secret, nothing else changed."""
    shared = K8S / "shared"
    kustomization = yaml.safe_load((shared / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../"]
    (patch_ref,) = kustomization["patches"]
    patch = yaml.safe_load((shared / patch_ref["path"]).read_text())
    base = manifests()["StatefulSet"]
    assert (patch["kind"], patch["metadata"]["name"]) == ("StatefulSet", base["metadata"]["name"])
    assert patch["spec"]["replicas"] > 1
    spec = patch["spec"]["template"]["spec"]
    assert "volumes" not in spec  # nothing mounted beyond the base's
    _, init, main = pod()
    for patched, original in (
        (spec["initContainers"][0], init),
        (spec["containers"][0], main),
    ):
        assert patched["name"] == original.spec["name"]
        added = {e["name"]: e for e in patched["env"]}
        assert added["GATEWAY_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.name"
        )
        environ = {
            **image_env(),
            **original.environ,
            **{n: str(e["value"]) for n, e in added.items() if "value" in e},
            "GATEWAY_INSTANCE_ID": "privacy-gateway-0",  # what the pod's name gives
        }
        for name in environ:
            if name.startswith(ENV_PREFIX):
                config_key(name)
        config = effective_config(k8s_config_data(), environ)
        assert config.vehicle_broker.shared_group and config.store.url
        assert config.instance_id == "privacy-gateway-0"
        # The password reaches libpq as PGPASSWORD from a secret: never in the
        # URL (refused), and not as a mounted file (fsGroup makes it group-
        # readable, and libpq ignores a password file others can read).
        assert "@" in config.store.url and ":" not in config.store.url.split("@")[0][13:]
        password = added["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
        assert password["name"] and password["key"]
        assert "volumeMounts" not in patched
