"""What deploy/ installs agrees with the service's settings and command line."""

from __future__ import annotations

import configparser
import importlib
import json
import pkgutil
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic_settings import BaseSettings

import gazecam
from gazecam.llm.settings import LLMSettings
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
