"""What deploy/ installs agrees with the service's settings and command line."""

from __future__ import annotations

import configparser
import importlib
import json
import os
import pkgutil
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema_rs
import pytest
import yaml
from pydantic_settings import BaseSettings

import gazecam
from gazecam.llm.settings import LLMSettings
from gazecam.models import ModelSettings
from gazecam.server.settings import ServerSettings
from gazecam.settings import CaptureSettings
from tests.conftest import REPO


def test_the_env_example_is_valid_server_settings() -> None:
    env = {}
    for line in (REPO / "deploy" / "gazecam.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key.removeprefix("GAZECAM_").lower()] = value
    settings = ServerSettings(**env)  # a public host is accepted only with the token set
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.source == "neon://auto" and settings.token is not None


def test_the_unit_runs_the_installed_serve_command() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "deploy" / "gazecam.service")
    assert unit["Service"]["ExecStart"] == "/opt/gazecam/.venv/bin/gazecam serve"
    assert unit["Service"]["EnvironmentFile"] == "/etc/gazecam/gazecam.env"
    assert unit["Service"]["Restart"] == "on-failure"


# The GPU server (vLLM) and the box answering from it: what can be checked without Docker.
GPU = REPO / "deploy" / "gpu-server"
BOX = REPO / "deploy" / "box"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


def compose(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def env_file(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def flags(command: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as {name: value}."""
    assert all(arg.startswith("--") and "=" in arg for arg in command), command
    return dict(arg[2:].split("=", 1) for arg in command)


def gazecam_variables() -> set[str]:
    """Every GAZECAM_* variable some settings model of gazecam reads."""
    for module in pkgutil.walk_packages(gazecam.__path__, "gazecam."):
        if not module.name.endswith("__main__"):  # that one runs the command line
            importlib.import_module(module.name)
    found, todo = set(), list(BaseSettings.__subclasses__())
    while todo:
        model = todo.pop()
        todo += model.__subclasses__()
        prefix = model.model_config.get("env_prefix", "")
        if prefix == "GAZECAM_":
            found |= {f"{prefix}{name}".upper() for name in model.model_fields}
    return found


def healthcheck_url(service: dict[str, Any]) -> str:
    test = " ".join(service["healthcheck"]["test"])
    match = re.search(r"https?://[^'\" ]+", test)
    assert match is not None, test
    return match.group()


def test_the_gpu_server_serves_a_vlm_with_vllms_flags() -> None:
    spec = compose(GPU / "compose.yaml")
    assert set(spec["services"]) == {"vllm"}
    vllm = spec["services"]["vllm"]
    image, tag = vllm["image"].split(":")
    assert image == "vllm/vllm-openai" and re.fullmatch(r"v\d+\.\d+\.\d+", tag)  # pinned
    args = flags(vllm["command"])
    assert args["model"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert 0 < float(args["gpu-memory-utilization"]) < 1
    assert int(args["max-model-len"]) >= 4096 and int(args["max-num-seqs"]) >= 8
    # An ask sends two images, the gaze crop and the thumbnail, each at most a crop's pixels.
    assert json.loads(args["limit-mm-per-prompt"]) == {"image": 2, "video": 0}
    crop_px = CaptureSettings().crop_size_px
    assert json.loads(args["mm-processor-kwargs"]) == {"max_pixels": crop_px * crop_px}
    # The key comes from vllm.env (VLLM_API_KEY), never from the command line.
    assert "api-key" not in args and vllm["env_file"] == "vllm.env"
    assert env_file(GPU / "vllm.env.example")["VLLM_API_KEY"]
    assert vllm["ipc"] == "host" and vllm["ports"] == ["8000:8000"]
    (gpu,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert healthcheck_url(vllm) == "https://127.0.0.1:8000/health"
    # TLS: the boxes' API key never crosses the network in clear.
    assert args["ssl-certfile"].startswith("/certs/") and args["ssl-keyfile"].startswith("/certs/")
    assert "./certs:/certs:ro" in vllm["volumes"]


def test_the_box_env_files_set_only_gazecam_settings() -> None:
    variables = gazecam_variables()
    assert set(env_file(REPO / "deploy" / "gazecam.env.example")) <= variables
    env = env_file(BOX / "gazecam.env.example")
    assert set(env) <= variables
    fields = {key.removeprefix("GAZECAM_").lower(): value for key, value in env.items()}
    ServerSettings(**fields)  # a public host with a token long enough, a well-formed source
    assert LLMSettings(**fields).engine == "remote"


def test_the_box_runs_gazecam_answering_from_the_gpu_server() -> None:
    env = env_file(BOX / "gazecam.env.example")
    vllm = flags(compose(GPU / "compose.yaml")["services"]["vllm"]["command"])
    assert env["GAZECAM_ENGINE"] == "remote"
    assert env["GAZECAM_REMOTE_MODEL"] == vllm["served-model-name"]
    url = urlsplit(env["GAZECAM_REMOTE_URL"])
    # OpenAI's base URL on vLLM's port, over TLS (gazecam refuses to send a key in clear).
    assert url.scheme == "https" and url.port == 8000 and url.path == "/v1"
    spec = compose(BOX / "compose.yaml")
    assert set(spec["services"]) == {"gazecam"}
    box = spec["services"]["gazecam"]
    assert box["env_file"] == "gazecam.env" and box["network_mode"] == "host"
    assert box["environment"]["SSL_CERT_FILE"] == "/etc/gazecam/ca.crt"
    assert "./ca.crt:/etc/gazecam/ca.crt:ro" in box["volumes"]
    assert healthcheck_url(box) == f"http://127.0.0.1:{env['GAZECAM_PORT']}/healthz"
    assert (BOX / box["build"]["context"] / box["build"]["dockerfile"]).resolve() == (
        BOX / "Dockerfile"
    )
    text = (BOX / "Dockerfile").read_text()
    (extras,) = re.findall(r'pip install [^"]*"/opt/gazecam\[([a-z,-]+)\]"', text)
    pyproject = (REPO / "pyproject.toml").read_text()  # tomllib: Python 3.11 on
    for extra in extras.split(","):
        assert re.search(rf"^{extra} = \[", pyproject, re.MULTILINE), extra
    assert "exec gazecam serve" in text


def test_no_secret_is_written_in_the_deploy_files() -> None:
    for path in (GPU / "compose.yaml", GPU / "lb.compose.yaml", BOX / "compose.yaml"):
        for name, service in compose(path)["services"].items():
            # Secrets come from the env files only, which are not in the repository.
            environment = service.get("environment", {})
            assert not [key for key in environment if SECRET_NAME.search(key)], (path, name)
    for path in (GPU / "vllm.env.example", BOX / "gazecam.env.example"):
        for key, value in env_file(path).items():
            if SECRET_NAME.search(key) and value:
                assert value.startswith("change-me"), (path, key)
    assert "/deploy/*/*.env" in (REPO / ".gitignore").read_text().splitlines()


def test_the_load_balancer_spreads_asks_over_gpu_servers() -> None:
    conf = (GPU / "nginx.conf").read_text()
    (upstream,) = re.findall(r"upstream vllm \{(.*?)\}", conf, re.DOTALL)
    assert re.search(r"^\s*least_conn;", upstream, re.MULTILINE)
    assert len(re.findall(r"^\s*server \S+:8000\b", upstream, re.MULTILINE)) >= 2
    directives = {line.strip() for line in conf.splitlines()}
    tls = {"proxy_pass https://vllm;", "proxy_ssl_verify on;", "listen 8000 ssl;"}
    assert tls | {"proxy_buffering off;", "listen 127.0.0.1:8080;"} <= directives
    nginx = compose(GPU / "lb.compose.yaml")["services"]["nginx"]
    assert nginx["volumes"] == [
        "./nginx.conf:/etc/nginx/conf.d/default.conf:ro",
        "./certs:/etc/nginx/certs:ro",
    ]
    assert healthcheck_url(nginx) == "http://127.0.0.1:8080/health"  # loopback only


# The GPU boxes: a Jetson (JetPack 6) and an x86 NVIDIA GPU, gazecam in a container whose
# entrypoint builds the TensorRT engines at the first start. Checked without Docker or a GPU.
JETSON = REPO / "deploy" / "jetson"
X86_GPU = REPO / "deploy" / "gpu"
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"
CONTAINER_UNIT = REPO / "deploy" / "gazecam-container@.service"
COMPOSE_SCHEMA = REPO / "tests" / "data" / "compose-spec" / "compose-spec.json"
CONTAINER_HOME = Path("/home/gazecam")


def test_every_compose_file_is_valid_compose() -> None:
    # The Compose Specification's own schema, as Docker Compose validates a file against it.
    validator = jsonschema_rs.validator_for(json.loads(COMPOSE_SCHEMA.read_text()))
    paths = sorted((REPO / "deploy").glob("*/*compose.yaml"))
    assert {JETSON / "compose.yaml", X86_GPU / "compose.yaml"} <= set(paths)
    for path in paths:
        errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(compose(path))]
        assert errors == [], path
    # The schema does catch mistakes: a misspelt key, a wrong type.
    broken = compose(JETSON / "compose.yaml")
    broken["services"]["gazecam"] |= {"restrat": "always", "runtime": 3}
    assert len(list(validator.iter_errors(broken))) == 2


@pytest.mark.parametrize("folder", [JETSON, X86_GPU], ids=["jetson", "x86"])
def test_the_gpu_box_serves_and_builds_engines_in_one_image(folder: Path) -> None:
    spec = compose(folder / "compose.yaml")
    assert set(spec["services"]) == {"gazecam", "build-engines"}
    serve, build = spec["services"]["gazecam"], spec["services"]["build-engines"]
    # The one-shot shares everything with the service but its command, and runs only when asked.
    same = ("build", "image", "network_mode", "env_file", "volumes", "runtime", "deploy")
    assert {key: serve.get(key) for key in same} == {key: build.get(key) for key in same}
    assert build["profiles"] == ["build-engines"] and build["restart"] == "no"
    assert build["entrypoint"] == ["gazecam-entrypoint", "build-engines"]
    assert serve["restart"] == "unless-stopped" and "entrypoint" not in serve
    # The settings file of the venv install (one file on the box, whichever unit runs it), and
    # the folder its task card is in.
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "deploy" / "gazecam.service")
    assert serve["env_file"] == unit["Service"]["EnvironmentFile"]
    env = env_file(REPO / "deploy" / "gazecam.env.example")
    assert Path(env["GAZECAM_TASK"]).parent == Path("/etc/gazecam")
    assert "/etc/gazecam:/etc/gazecam:ro" in serve["volumes"]
    # The models (and the engines built from them, which live in the model cache) on a volume,
    # at the cache of the image's user.
    models_dir = ModelSettings.model_fields["models_dir"].default  # in the user's home
    cache = (CONTAINER_HOME / models_dir.relative_to(Path.home())).parent
    assert f"models:{cache}" in serve["volumes"] and "models" in spec["volumes"]
    assert serve["network_mode"] == "host"  # neon://auto: mDNS on the site network
    assert healthcheck_url(serve) == f"http://127.0.0.1:{env['GAZECAM_PORT']}/healthz"
    # The image: built from the repository by this folder's Dockerfile, as the image's user.
    assert (folder / serve["build"]["context"] / serve["build"]["dockerfile"]).resolve() == (
        folder / "Dockerfile"
    )
    text = (folder / "Dockerfile").read_text()
    assert re.search(rf"^USER {CONTAINER_HOME.name}$", text, re.MULTILINE)
    assert "COPY deploy/entrypoint.sh /usr/local/bin/gazecam-entrypoint" in text
    assert 'ENTRYPOINT ["gazecam-entrypoint"]' in text and 'CMD ["serve"]' in text
    (extras,) = re.findall(r'pip3 install [^"]*"/opt/gazecam\[([a-z,-]+)\]"', text)
    pyproject = (REPO / "pyproject.toml").read_text()
    for extra in extras.split(","):
        assert re.search(rf"^{extra} = \[", pyproject, re.MULTILINE), extra
    # Pinned: the base image's tag, and the GPU builds of ONNX Runtime (and TensorRT).
    (base,) = re.findall(r"^FROM (\S+)$", text, re.MULTILINE)
    assert re.fullmatch(r"nvcr\.io/nvidia/[a-z0-9-]+:[a-z0-9.-]+", base) and "latest" not in base
    assert re.search(r"onnxruntime-gpu==\d+\.\d+\.\d+\b", text)
    assert "pip3 uninstall -y onnxruntime" in text  # the CPU build would shadow the GPU one
    assert (folder / "Dockerfile.dockerignore").read_text() == (
        BOX / "Dockerfile.dockerignore"
    ).read_text()


def test_the_jetson_and_x86_boxes_reach_their_gpu() -> None:
    jetson = compose(JETSON / "compose.yaml")["services"]["gazecam"]
    assert jetson["runtime"] == "nvidia" and "deploy" not in jetson
    assert "/usr/bin/tegrastats:/usr/bin/tegrastats:ro" in jetson["volumes"]  # /metrics
    assert "FROM nvcr.io/nvidia/l4t-jetpack:r36." in (JETSON / "Dockerfile").read_text()
    x86 = compose(X86_GPU / "compose.yaml")["services"]["gazecam"]
    assert "runtime" not in x86
    (gpu,) = x86["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


def test_the_container_unit_runs_compose_in_the_instances_folder() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(CONTAINER_UNIT)
    service = unit["Service"]
    assert service["WorkingDirectory"] == "/opt/gazecam/deploy/%i"
    # gazecam-container@jetson and @gpu: each instance is a folder with the service.
    for instance in ("jetson", "gpu"):
        assert "gazecam" in compose(REPO / "deploy" / instance / "compose.yaml")["services"]
    assert service["ExecStart"] == "/usr/bin/docker compose up --build --remove-orphans gazecam"
    assert service["ExecStop"] == "/usr/bin/docker compose down"
    assert service["Restart"] == "on-failure"
    assert unit["Unit"]["Requires"] == "docker.service"
    assert "docker.service" in unit["Unit"]["After"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_no_secret_is_written_in_the_gpu_box_files() -> None:
    for folder in (JETSON, X86_GPU):
        for name, service in compose(folder / "compose.yaml")["services"].items():
            environment = service.get("environment", {})
            assert not [key for key in environment if SECRET_NAME.search(key)], (folder, name)
        assert not SECRET_NAME.search((folder / "Dockerfile").read_text())


# The entrypoint, run by sh with fakes of gazecam and nvidia-smi first on PATH. The fake
# gazecam writes each command it runs to a log and exits as its FAKE_* variable says.
FAKE_GAZECAM = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
case "$1 $2" in
"models fetch") exit "${FAKE_FETCH_EXIT:-0}" ;;
"engines build")
    [ -z "${FAKE_BUILD_ERROR:-}" ] || printf '%s\\n' "$FAKE_BUILD_ERROR" >&2
    exit "${FAKE_BUILD_EXIT:-0}" ;;
esac
"""
H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5f1f2b1c-0d8e-4c4e-9f0a-2b7d1c3e4f5a)"


def run_entrypoint(
    tmp_path: Path, *args: str, gpu: bool = True, **fake: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The entrypoint's result, and the gazecam commands it ran."""
    if Path("/dev/nvgpu/igpu0").exists() or Path("/dev/nvhost-ctrl-gpu").exists():
        pytest.skip("a Jetson GPU is here: the entrypoint sees it whatever nvidia-smi says")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "gazecam").write_text(FAKE_GAZECAM)
    # nvidia-smi -L lists the GPUs; without a GPU or driver, it fails (exit 9, "couldn't
    # communicate with the NVIDIA driver").
    smi = f"echo '{H100}'" if gpu else "echo 'NVIDIA-SMI has failed' >&2; exit 9"
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}\n")
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    log = tmp_path / "commands.log"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        **{f"FAKE_{key.upper()}": value for key, value in fake.items()},
    }
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30
    )
    return result, log.read_text().splitlines() if log.exists() else []


def test_with_a_gpu_the_entrypoint_builds_the_engines_then_serves(tmp_path: Path) -> None:
    result, commands = run_entrypoint(tmp_path)
    assert commands == ["models fetch", "engines build", "serve"]
    assert result.returncode == 0
    assert result.stderr == "gazecam-entrypoint: engines ready\n"
    # Flags after `serve` go to gazecam serve.
    _, commands = run_entrypoint(tmp_path / "flags", "serve", "--port", "8001")
    assert commands[-1] == "serve --port 8001"


def test_a_failed_build_is_one_line_and_the_service_starts(tmp_path: Path) -> None:
    error = "gazecam: error: TensorRT 8.6 is too old: engines need TensorRT 10 or later"
    result, commands = run_entrypoint(tmp_path, build_exit="2", build_error=error)
    assert commands == ["models fetch", "engines build", "serve"]
    assert result.returncode == 0
    assert result.stderr == (
        f"gazecam-entrypoint: engines not built (exit 2: {error}): "
        "serving on the fallback providers\n"
    )


def test_a_crashed_build_is_shown_whole_and_the_service_starts(tmp_path: Path) -> None:
    traceback = "Traceback (most recent call last):\nRuntimeError: CUDA driver is insufficient"
    result, commands = run_entrypoint(tmp_path, build_exit="1", build_error=traceback)
    assert commands == ["models fetch", "engines build", "serve"]
    assert result.stderr.splitlines() == [
        *traceback.splitlines(),
        "gazecam-entrypoint: engines not built (exit 1: RuntimeError: CUDA driver is "
        "insufficient): serving on the fallback providers",
    ]


def test_without_a_gpu_the_entrypoint_says_so_and_serves_on_the_cpu(tmp_path: Path) -> None:
    result, commands = run_entrypoint(tmp_path, gpu=False)
    assert commands == ["models fetch", "serve"]
    assert result.returncode == 0
    assert result.stderr == (
        "gazecam-entrypoint: no NVIDIA GPU visible (nvidia-smi -L, /dev/nvgpu): engines not "
        "built, serving on the CPU\n"
    )


def test_the_one_shot_builds_with_its_flags_or_refuses_without_a_gpu(tmp_path: Path) -> None:
    flags = ("--precision", "int8", "--calibrate", "/rec")
    result, commands = run_entrypoint(tmp_path / "gpu", "build-engines", *flags, build_exit="0")
    assert commands == ["models fetch", "engines build --precision int8 --calibrate /rec"]
    assert result.returncode == 0 and result.stderr == ""
    # The build's own exit code is the one-shot's (it is exec'd).
    result, _ = run_entrypoint(tmp_path / "fails", "build-engines", build_exit="2")
    assert result.returncode == 2
    result, commands = run_entrypoint(tmp_path / "cpu", "build-engines", *flags, gpu=False)
    assert commands == ["models fetch"] and result.returncode == 2
    assert result.stderr == (
        "gazecam-entrypoint: no NVIDIA GPU visible (nvidia-smi -L, /dev/nvgpu): "
        "cannot build engines\n"
    )


def test_models_that_cannot_be_fetched_stop_the_start(tmp_path: Path) -> None:
    result, commands = run_entrypoint(tmp_path, fetch_exit="2")
    assert commands == ["models fetch"]  # neither a build nor a service without its models
    assert result.returncode == 2
    assert result.stderr == (
        "gazecam-entrypoint: models not fetched (exit 2, its reason above): not serving\n"
    )
    # Any other command runs as it is, e.g. to look at the models and their providers.
    _, commands = run_entrypoint(tmp_path / "other", "gazecam", "models", "list")
    assert commands == ["models list"]
