"""The config: the documented reference can't drift, and bad configs give one clear line per problem."""
from __future__ import annotations

import http.server
import json
import re
import socket
import threading
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from engine.cli import app
from engine.integrations.config import (
    ConfigError,
    EngineConfig,
    check_config,
    config_reference,
    config_reference_markdown,
    defaults_yaml,
    load_config,
    ray_address_problem,
    set_dotted,
)

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "engine.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _ready_workdir(tmp_path: Path) -> dict:
    """A config whose images, ground truth and holdout exist (tiny files are enough for the checks)."""
    for d in ("imgs", "holdout"):
        (tmp_path / d).mkdir()
    (tmp_path / "gt.json").write_text("{}")
    (tmp_path / "holdout.json").write_text("{}")
    return {"workdir": str(tmp_path), "images": {"source": "imgs", "ground_truth": "gt.json",
                                                 "holdout_source": "holdout", "holdout_ground_truth": "holdout.json"}}


# --- the reference ---------------------------------------------------------------------------

def _config_reads() -> set[tuple[str, str]]:
    """(section, field) pairs the engine reads from a config object outside the config modules: `cfg.eval.x`,
    `auto = cfg.stages.auto; auto.x`, `section: AutoStageConfig` then `section.x`, `getattr(cfg.train, "x")` and
    `for name in ("x", ...): getattr(cfg.train, name)`. A section is named by its last key (`auto`, `train`)."""
    import ast

    section_of_class = {cls.__name__: name for name, cls in _sections(EngineConfig)}

    def section(node, alias) -> set[str]:
        if isinstance(node, ast.Attribute):
            return {node.attr}
        if isinstance(node, ast.Name):
            return alias.get(node.id, {node.id})
        if isinstance(node, ast.IfExp):
            return section(node.body, alias) | section(node.orelse, alias)
        return set()

    reads, skip = set(), {"config.py", "config_check.py"}
    for folder in ("engine", "stages", "model", "storage"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.parent.name == "integrations" and path.name in skip:
                continue
            for scope in ast.walk(ast.parse(path.read_text())):
                if not isinstance(scope, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                alias: dict[str, set[str]] = {}
                loops: dict[str, set[str]] = {}
                for node in ast.walk(scope):
                    if isinstance(node, ast.arg) and isinstance(node.annotation, ast.Name) \
                            and node.annotation.id in section_of_class:
                        alias[node.arg] = {section_of_class[node.annotation.id]}
                    if isinstance(node, ast.Assign) and len(node.targets) == 1:
                        target, value = node.targets[0], node.value
                        pairs = (zip(target.elts, value.elts) if isinstance(target, ast.Tuple)
                                 and isinstance(value, ast.Tuple) else [(target, value)])
                        for t, v in pairs:
                            if isinstance(t, ast.Name) and section(v, {}):
                                alias[t.id] = section(v, {})
                    if isinstance(node, ast.For) and isinstance(node.target, ast.Name) \
                            and isinstance(node.iter, (ast.Tuple, ast.List)):
                        loops[node.target.id] = {e.value for e in node.iter.elts if isinstance(e, ast.Constant)}
                for node in ast.walk(scope):
                    if isinstance(node, ast.Attribute):
                        reads |= {(s, node.attr) for s in section(node.value, alias)}
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                            and len(node.args) >= 2:
                        names = ({node.args[1].value} if isinstance(node.args[1], ast.Constant)
                                 else loops.get(getattr(node.args[1], "id", ""), set()))
                        reads |= {(s, n) for s in section(node.args[0], alias) for n in names}
    return reads


def _sections(model, name: str = "cfg"):
    """(section name, section class) for the root and every nested section."""
    from pydantic import BaseModel

    yield name, model
    for field, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _sections(info.annotation, field)


def test_every_documented_key_is_read_by_the_engine():
    """A key documented in docs/config.md that nothing reads is a promise nobody keeps (`eval.max_objects` was
    one): every key must be read from its section somewhere outside the config and its checks."""
    from pydantic import BaseModel

    reads = _config_reads()
    unread = [f"{'' if name == 'cfg' else name + '.'}{field}" for name, cls in _sections(EngineConfig)
              for field, info in cls.model_fields.items()
              if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel))
              and (name, field) not in reads]
    assert not unread, f"documented keys nothing reads (wire them or remove them): {unread}"


def test_docs_config_md_holds_the_generated_reference():
    doc = (REPO / "docs" / "config.md").read_text()
    block = re.search(r"<!-- BEGIN GENERATED[^>]*-->\n(.*?)<!-- END GENERATED -->", doc, re.S)
    assert block, "docs/config.md lost its generated block"
    assert block.group(1) == config_reference_markdown(), (
        "docs/config.md is out of date: regenerate the table with `sa-engine config --reference`")


def test_every_key_is_documented_with_its_default():
    rows = config_reference()
    undocumented = [r["key"] for r in rows if not r["doc"]]
    assert not undocumented, f"add a trailing `# meaning` comment in engine/integrations/config.py for: {undocumented}"
    keys = {r["key"] for r in rows}
    assert {"images.source", "stages.manual.rounds", "model.bootstrap_steps", "eval.promote_metric",
            "labelstudio.managed", "ray.address"} <= keys
    defaults = EngineConfig().model_dump()
    for r in rows:
        node = defaults
        for part in r["key"].split("."):
            node = node[part]
        assert node == r["default"], r["key"]


def test_printed_defaults_are_a_valid_config_equal_to_the_defaults(tmp_path):
    text = defaults_yaml()
    assert "# local folder or s3://bucket/prefix" in text
    assert load_config(_write(tmp_path, yaml.safe_load(text))) == EngineConfig()
    result = CliRunner().invoke(app, ["config", "--print-defaults"])
    assert result.exit_code == 0 and result.stdout == text


# --- type-level errors -----------------------------------------------------------------------

def test_unknown_key_names_the_key_and_suggests_the_spelling(tmp_path):
    p = _write(tmp_path, {"stages": {"manual": {"image_per_round": 4}}, "trian": {}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    lines = str(e.value).splitlines()
    assert len(lines) == 2
    assert f"{p}: stages.manual.image_per_round: unknown key (did you mean 'images_per_round'?)" in lines
    assert f"{p}: trian: unknown key (did you mean 'train'?)" in lines


def test_a_key_that_moved_names_its_new_place(tmp_path):
    """Calibration keys shared by the semi and automatic stages live in `calibration`, the simulated annotators'
    keys in `simulate`: an old config is told where each went, one line per key, and nothing runs."""
    from engine.integrations.config import RENAMED

    p = _write(tmp_path, {"stages": {"semi": {"calibration_min_kept": 3, "review_accept_iou": 0.8},
                                     "manual": {"max_clicks": 4}}, "train": {"max_steps": 10}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    lines = str(e.value).splitlines()
    assert f"{p}: stages.semi.calibration_min_kept: renamed: use calibration.min_kept" in lines
    assert f"{p}: stages.semi.review_accept_iou: renamed: use simulate.review_accept_iou" in lines
    assert f"{p}: stages.manual.max_clicks: renamed: use simulate.max_clicks" in lines and len(lines) == 4
    for new in RENAMED.values():  # every hint names a key that exists (a KeyError otherwise)
        _default(new.split(" ")[0])

def _default(key: str):
    value = load_config(None).model_dump()
    for part in key.split("."):
        value = value[part]
    return value


def test_wrong_type_names_the_key_and_the_value(tmp_path):
    p = _write(tmp_path, {"train": {"minutes": "ten"}, "stages": {"final_auto": "some"}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    minutes, final = sorted(str(e.value).splitlines(), key=lambda line: "train.minutes" not in line)
    assert minutes.startswith(f"{p}: train.minutes: ") and minutes.endswith("(got 'ten')")
    assert final.startswith(f"{p}: stages.final_auto: ") and "'remaining'" in final


def test_not_a_mapping_and_bad_yaml(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(p)
    p.write_text("images: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


# --- checks beyond types ---------------------------------------------------------------------

def test_a_complete_local_config_has_no_problems(tmp_path):
    cfg = load_config(_write(tmp_path, _ready_workdir(tmp_path)))
    assert check_config(cfg) == []


def test_missing_image_source_and_holdout(tmp_path):
    data = _ready_workdir(tmp_path)
    data["images"]["source"] = "nowhere"
    data["images"]["holdout_source"] = None
    problems = check_config(load_config(_write(tmp_path, data)), network=False)
    assert f"images.source: {tmp_path / 'nowhere'}: not found" in problems
    assert any(p.startswith("images.holdout_source: required") for p in problems)
    assert len(problems) == 2


@pytest.mark.parametrize("key,value", [
    ("stages.auto.points_per_side", -4), ("stages.auto.num_actors", 0), ("stages.auto.pred_iou_thresh", 1.5),
    ("stages.auto.images_per_commit", -1), ("labelstudio.port", 99999), ("labelstudio.ml_backend_port", 0),
    ("stages.manual.images_per_round", 0), ("stages.auto.max_mask_fraction", 1.5), ("train.steps", 0),
    ("train.minutes", 0), ("images.max_side", 8), ("stages.auto.crop_n_layers", 9), ("ray.cpus_per_actor", 0),
    ("stages.semi.audit_fraction", -0.1), ("images.load_timeout_s", 0), ("images.max_pixels", 0)])
def test_every_number_is_range_checked_when_read(tmp_path, key, value):
    data = {}
    set_dotted(data, key, value)
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, data))
    line = str(e.value)
    assert "\n" not in line and f": {key}: Input should be" in line and repr(value) in line


def test_numbers_that_must_agree_with_each_other(tmp_path):
    data = _ready_workdir(tmp_path)
    data["eval"] = {"clicks": [1, 3], "promote_metric": "miou@5"}
    problems = check_config(load_config(_write(tmp_path, data)), network=False)
    assert any(p.startswith("eval.promote_metric: 'miou@5' is not measured") for p in problems)


def test_ground_truth_needed_only_for_simulated_annotators(tmp_path):
    data = _ready_workdir(tmp_path)
    data["images"]["ground_truth"] = None
    problems = check_config(load_config(_write(tmp_path, data)), network=False)
    assert problems == ["images.ground_truth: required when stages.simulate is true (simulated annotators)"]
    data["stages"] = {"simulate": False}
    assert check_config(load_config(_write(tmp_path, data)), network=False) == []


def test_unreachable_label_studio_and_missing_token(tmp_path, monkeypatch):
    monkeypatch.delenv("SA_ENGINE_LS_TOKEN", raising=False)
    data = _ready_workdir(tmp_path)
    url = f"http://127.0.0.1:{_free_port()}"
    data["labelstudio"] = {"managed": False, "url": url}
    problems = check_config(load_config(_write(tmp_path, data)))
    assert len(problems) == 2
    assert problems[0].startswith(f"labelstudio.url: {url}/health: unreachable (")
    assert problems[1].startswith("labelstudio.token: required when labelstudio.managed is false")
    data["labelstudio"] = {"managed": False}
    assert "labelstudio.url: required when labelstudio.managed is false" in check_config(
        load_config(_write(tmp_path, data)), network=False)


def test_reachable_label_studio_passes_and_an_error_status_is_named(tmp_path):
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/health"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(json.dumps({"status": "UP"}).encode() if ok else b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        data = _ready_workdir(tmp_path)
        base = f"http://127.0.0.1:{server.server_address[1]}"
        data["labelstudio"] = {"managed": False, "url": base, "token": "t" * 40}
        assert check_config(load_config(_write(tmp_path, data))) == []
        data["labelstudio"]["url"] = base + "/sub"
        assert check_config(load_config(_write(tmp_path, data))) == [
            f"labelstudio.url: {base}/sub/health: answered HTTP 404"]
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_ray_address_names_the_key(tmp_path):
    cfg = load_config(_write(tmp_path, {**_ready_workdir(tmp_path), "ray": {"address": f"ray://127.0.0.1:{_free_port()}"}}))
    problems = check_config(cfg)
    assert len(problems) == 1 and problems[0].startswith("ray.address: ray://127.0.0.1:") and "unreachable" in problems[0]
    other = f"127.0.0.1:{_free_port()}"
    problems = check_config(cfg, address=other)
    assert len(problems) == 1 and problems[0].startswith(f"--address: {other}: unreachable")
    assert ray_address_problem("local") is None
    assert "port 'x' is not a number" in ray_address_problem("ray://h:x")
    assert "expected 'local'" in ray_address_problem("http://h:1")


def test_ray_auto_without_a_cluster(monkeypatch):
    if Path("/tmp/ray/ray_current_cluster").exists():
        pytest.skip("a Ray cluster was started on this node")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address_problem("auto").startswith("ray.address: 'auto' but no Ray cluster runs on this node")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what `ray job submit` sets for the entrypoint
    assert ray_address_problem("auto") is None


def test_missing_s3_bucket_is_named(tmp_path, s3_bucket):
    data = _ready_workdir(tmp_path)
    data["storage"] = {"root": "s3://nope-not-there/store", "s3_endpoint_url": s3_bucket.endpoint_url,
                       "s3_region": "us-east-1"}
    assert check_config(load_config(_write(tmp_path, data))) == [
        "storage.root: s3://nope-not-there/store: bucket does not exist"]
    data["storage"]["root"] = f"{s3_bucket.uri}/store"
    data["images"]["source"] = "s3://nope-not-there/images"
    assert check_config(load_config(_write(tmp_path, data))) == [
        "images.source: s3://nope-not-there/images: bucket does not exist"]


def test_cli_check_prints_one_line_per_problem_and_exits_2(tmp_path):
    data = _ready_workdir(tmp_path)
    data["images"]["source"] = "nowhere"
    data["ray"] = {"address": f"ray://127.0.0.1:{_free_port()}"}
    p = _write(tmp_path, data)
    result = CliRunner().invoke(app, ["config", "--config", str(p), "--check"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "images.source:" in text and "not found" in text and "ray.address: ray://127.0.0.1:" in text
    result = CliRunner().invoke(app, ["run", "--config", str(p)])
    assert result.exit_code == 2 and "images.source:" in result.output


def test_docker_engine_config_is_valid():
    p = REPO / "docker" / "engine.yaml"
    cfg = load_config(p)
    assert cfg.storage.root.startswith("s3://") and not cfg.labelstudio.managed and cfg.ray.address == "auto"


def test_compose_file_has_the_services_and_the_dockerfile_the_targets():
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"ray-head", "ray-worker", "ray-gpu-worker", "ml-backend", "postgres", "label-studio", "minio"} <= set(services)
    assert services["label-studio"]["environment"]["DJANGO_DB"] == "default"
    assert services["label-studio"]["environment"]["POSTGRE_HOST"] == "postgres"
    targets = re.findall(r"^FROM \S+ AS (\w+)$", (REPO / "docker" / "Dockerfile").read_text(), re.M)
    assert {"cpu", "cuda"} <= set(targets)
    assert services["ray-gpu-worker"]["build"]["target"] == "cuda"


def test_a_key_given_twice_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys silently; the config names the key and the line instead."""
    path = tmp_path / "engine.yaml"
    path.write_text("train:\n  minutes: 2\n  lr: 0.001\n  minutes: 20\n")
    with pytest.raises(ConfigError, match=r"key 'minutes' is given twice.*line 4"):
        load_config(path)
    path.write_text("train:\n  minutes: 2\nstages:\n  manual:\n    rounds: 1\n")
    assert load_config(path).train.minutes == 2


@pytest.mark.parametrize("key,value,expect", [
    ("stages.auto.points_per_side", 1_000_000_000, "less than or equal to 256"),
    ("train.minutes", float("inf"), "finite number"),
    ("eval.promote_metric", "accuracy", "not a holdout metric"),
    ("labelstudio.ml_backend_port", 8089, "port and ml_backend_port are both 8089"),
    ("stages.auto.verifier", "missing-verifier.json", "not found"),
    ("storage.root", "/proc/self/store", "inside /proc, a system folder"),
    ("workdir", "", "at least 1 character"),
    ("stages.auto.num_actors", True, "valid integer"),
    ("stages.auto.points_per_side", "8", "valid integer"),
])
def test_values_a_type_alone_would_let_through_are_refused_in_one_line(tmp_path, key, value, expect):
    """Issue 31.11: each of these was accepted; `sa-engine config --check` refuses it with one line naming the
    key, and exit 2."""
    data = _ready_workdir(tmp_path)
    set_dotted(data, key, value)
    result = CliRunner().invoke(app, ["config", "--config", str(_write(tmp_path, data)), "--check"])
    assert result.exit_code == 2, result.output
    line = next(x for x in result.output.splitlines() if key.rsplit(".", 1)[-1] in x or key.split(".")[0] in x)
    assert expect in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and line.strip()


def test_markup_in_user_text_is_printed_as_it_is(tmp_path):
    """Issue 31.10: Rich markup in a config value is a config error of one line (exit 2), shown literally."""
    data = _ready_workdir(tmp_path)
    data["images"]["source"] = "imgs[/red]x"
    result = CliRunner().invoke(app, ["config", "--config", str(_write(tmp_path, data)), "--check"])
    assert result.exit_code == 2 and "imgs[/red]x" in result.output and "Traceback" not in result.output


def test_quarantine_list_prints_a_path_holding_markup(tmp_path):
    """Issue 31.10: a quarantined file whose path holds `[/red]` is listed as it is, with every other entry."""
    from engine.integrations import runtime

    p = _write(tmp_path, {"workdir": str(tmp_path)})
    q = runtime.quarantine(load_config(p))
    q.add(str(tmp_path / "imgs" / "a[/red]b.png"), "not an image [bold]", "auto")
    q.add(str(tmp_path / "imgs" / "c.png"), "truncated", "auto", "transient")
    result = CliRunner().invoke(app, ["quarantine", "list", "--config", str(p)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "a[/red]b.png: not an image [bold]" in text and "c.png: truncated" in text
