"""The README and the reference site (docs/, MkDocs) are the user's manual: their tables match the code, the
site builds strictly, and the README's links land on a page and a heading that exist."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from tlrun import config, passthrough
from tlrun.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parent.parent


def test_readme_exit_codes_match_errors() -> None:
    readme = (ROOT / "docs" / "configuration.md").read_text()
    for code, text in EXIT_CODES.items():
        assert f"| {code} | {text} |" in readme


def test_readme_lists_every_refused_passthrough_option() -> None:
    readme = (ROOT / "docs" / "commands.md").read_text()
    for names in [*passthrough.OWNED_OPTIONS, *passthrough.ROLE_OWNED_OPTIONS]:
        row = ", ".join(f"`{name}`" for name in names)
        assert f"| {row}" in readme, row


def test_env_example_documents_every_key() -> None:
    example = (ROOT / ".env.example").read_text()
    keys = [value for name, value in vars(config).items() if name.startswith("ENV_")]
    assert keys
    for key in keys:
        assert key in example, f"{key} is not documented in .env.example"


def test_reliability_tables_are_generated_from_the_tests() -> None:
    """docs/reliability.md shows the bad-input cases the tests run, and counts that match its tables."""
    import re
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from bad_inputs import CASES, table

    doc = (ROOT / "docs" / "reliability.md").read_text()
    shown = doc.split("<!-- bad-inputs:start -->\n", 1)[1].split("<!-- bad-inputs:end -->", 1)[0]
    assert shown == table(), "run `python tests/bad_inputs.py` and paste its table into docs/reliability.md"
    faults = re.findall(r"^\| \d+c? \| .*? \| (.*?) \| .*$", doc, re.M)
    sources = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    for cell in faults:  # every fault row names tests that exist
        for name in re.findall(r"`(?:[\w.]+::)?(test_\w+)", cell):
            assert f"def {name}(" in sources, name
    counts = doc.split("<!-- counts:start -->\n", 1)[1].split("<!-- counts:end -->", 1)[0]
    assert f"Faults tried: {len(faults)}, survived: {len(faults)}." in counts
    assert f"Bad inputs tried: {len(CASES)}," in counts and "Secrets leaked: 0." in counts


# -- the container recipe: Docker is not needed to check that it asks tlrun for things tlrun has ----------
DOCKER = ROOT / "examples" / "docker"


def _dockerfile() -> dict[str, list[str]]:
    """ENTRYPOINT, CMD and HEALTHCHECK's CMD (exec form), and the ENV and USER lines, of the Dockerfile."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in ("ENTRYPOINT", "CMD"):
            found[word] = json.loads(rest)
        elif word == "HEALTHCHECK":
            found["HEALTHCHECK"] = json.loads(rest.split(" CMD ", 1)[1])
        elif word in ("ENV", "USER"):
            found.setdefault(word, []).extend(shlex.split(rest))
    return found


def _tlrun_accepts(args: list[str]) -> None:
    """Click reads every option name before --help acts: an option tlrun does not have fails here."""
    result = subprocess.run(
        [sys.executable, "-m", "tlrun", *args, "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, f"tlrun {' '.join(args)}: {result.stderr}"


def test_the_dockerfile_runs_tlrun_as_a_non_root_entrypoint() -> None:
    docker = _dockerfile()
    assert docker["ENTRYPOINT"] == ["tlrun"]
    assert docker["USER"] and docker["USER"][0] not in ("root", "0")
    _tlrun_accepts(docker["CMD"])
    assert docker["HEALTHCHECK"][:2] == ["tlrun", "health"]
    _tlrun_accepts(docker["HEALTHCHECK"][1:])
    env = dict(item.split("=", 1) for item in docker["ENV"])
    assert float(env["TLRUN_STOP_GRACE"]) < 10  # docker stop's default SIGKILL comes after 10 s


def test_the_compose_file_runs_a_worker_beat_redis_and_flower() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "worker", "beat", "flower"}
    for name in ("worker", "beat"):
        _tlrun_accepts(services[name]["command"])
    worker = services["worker"]
    period = worker["stop_grace_period"]
    assert period.endswith("s") and float(period[:-1]) > float(worker["environment"]["TLRUN_STOP_GRACE"])
    assert "replicas" not in services["beat"].get("deploy", {})  # one beat


def test_the_kubernetes_page_shows_what_tlrun_export_kubernetes_writes(tmp_path: Path) -> None:
    """docs/kubernetes.md's Deployment is the export's own output for the settings the page names, and it gives
    tlrun its grace before the kubelet's SIGKILL."""
    import os

    text = (ROOT / "docs" / "kubernetes.md").read_text()
    shown = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "pyproject.toml").write_text('[tool.tlrun]\napp = "proj.celery"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "TLRUN_"))}
    args = ["--image", "registry.example.com/proj:1.4", "--grace", "60", "--namespace", "jobs"]
    done = subprocess.run(
        [sys.executable, "-m", "tlrun", "export", "kubernetes", *args],
        cwd=tmp_path,
        env={**env, "TLRUN_CONCURRENCY": "4"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    first = done.stdout.split("---\n")[0]
    assert shown == first[first.index("apiVersion") :], "paste the export's first document into docs/kubernetes.md"
    manifest = yaml.safe_load(shown)
    pod = manifest["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[0] == "tlrun"
    _tlrun_accepts(command[1:])
    grace = float(command[command.index("--grace") + 1])
    assert pod["terminationGracePeriodSeconds"] > grace
    for probe in ("readinessProbe", "livenessProbe"):
        _tlrun_accepts(pod["containers"][0][probe]["exec"]["command"][1:])


def test_the_readme_ps_example_shows_beats_node_as_ps_prints_it() -> None:
    from tlrun.launch.units import BeatUnit

    readme = (ROOT / "docs" / "commands.md").read_text()
    example = readme.split("    $ tlrun ps\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header = example[0].split()
    beat = next(line.split() for line in example[1:] if line.split()[1] == "beat")
    assert beat[header.index("NODE")] == BeatUnit().node


def test_the_container_recipe_as_an_experienced_docker_user_expects_it() -> None:
    """A .dockerignore (no .venv, .git or .env in the build context), the lock installed, a build for every
    service that runs the image, Flower behind a password and on loopback, restart policies, and a grace
    that lets the documented task length (25 s) finish before tlrun's requeue margin."""
    from tlrun.launch.supervise import requeue_margin

    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv/", ".git/", ".env"} <= set(ignored)
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "pip install -c requirements-dev.lock ." in dockerfile
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    for name, service in services.items():
        if service.get("image") == "tlrun-example":
            assert "build" in service, name
        assert service.get("restart") == "unless-stopped", name
    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])
    grace = float(services["worker"]["environment"]["TLRUN_STOP_GRACE"])
    margin = requeue_margin(grace, (5, 7)) or 0.0
    assert grace - margin >= 25


def test_readme_metrics_section_lists_every_metric_the_endpoint_serves() -> None:
    """Every family the launcher's endpoint can serve (a sample with every field set) has its row."""
    from tlrun.ops import metrics
    from tlrun.ops.taskmetrics import Totals

    worker = metrics.WorkerSample("api1@h", "default", True, 1, 0, 0, 1.0, 1.0, 2, 2, 10, ("celery",), 1, 1, 2)
    tasks = Totals()
    tasks.add({"counters": [["succeeded", "t", "celery", "", 1]], "runtime": [["t", "celery", [1.0] + [0.0] * 16]]})
    tasks.add({"wait": [["t", "celery", [1.0] + [0.0] * 16]]})
    sample = metrics.LauncherSample(
        (worker,), {"celery": 1}, True, "h", 1, {"t": 1}, True, "app", "proj", (("default", "h", tasks),)
    )
    section = (ROOT / "docs" / "metrics.md").read_text()
    names = set()
    for family in metrics.LauncherCollector(lambda: sample).collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    assert len(names) == 25, sorted(names)
    for name in sorted(names):
        assert f"| `{name}` |" in section or f"`{name}`," in section, name


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a broken link or anchor, or a page left out of the navigation, fails."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "kubernetes" / "index.html").is_file()


def test_the_readmes_links_land_on_a_page_and_a_heading() -> None:
    """The README is outside the site: its relative links are checked here, anchors by the site's own slugs."""
    import re

    from markdown.extensions.toc import slugify

    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 300, "the README fits its first job: the reference goes to docs/"
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert len(links) >= 10, links
    for target, anchor in links:
        path = ROOT / target
        assert path.is_file(), target
        if anchor:
            headings = re.findall(r"^#{1,6} (.+)$", path.read_text(), re.M)
            assert anchor in {slugify(h, "-") for h in headings}, (target, anchor)
