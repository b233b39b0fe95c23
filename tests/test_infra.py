"""infra/: the rendered Kubernetes manifests validate (KubeRay CRD schemas, Kubernetes' own schemas), run the CLI's
command line, share one Ray cluster shape and keep secrets in Secrets; the image is built right; the local S3
helper serves what it uploaded."""

import copy
import importlib.util
import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import s3fs
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
SHARED_CRDS = ROOT.parent / "shared" / "kuberay-crds"
README = ROOT / "README.md"
KUBERNETES_VERSIONS = ("1.27", "1.37")  # CronJob's timeZone is GA since 1.27; the newest schemas shipped
SECRET_LOOKING = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_module(K8S / "render.py")
caption_cli = load_module(ROOT / "jobs" / "caption_dataset.py")


@pytest.fixture(params=["values.yaml", "overlays/example.yaml"])
def values(request):
    """The settings as rendered: the defaults alone, and with the example overlay merged over them."""
    return render.load_values([] if request.param == "values.yaml" else [K8S / request.param])


@pytest.fixture
def manifests(values):
    return render.render(values)


# --- validation --------------------------------------------------------------------------------------------------


def strict(schema: dict) -> dict:
    """``schema`` with unknown fields made errors, as `kubectl apply` (strict field validation) makes them.

    A CRD's structural schema lists its fields but leaves additionalProperties open (the API server prunes or
    rejects unknown fields itself), so plain jsonschema would let a misspelt field through.
    """
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(field) for name, field in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for keyword in ("items", "additionalProperties"):
        if isinstance(out.get(keyword), dict):
            out[keyword] = strict(out[keyword])
    for keyword in ("allOf", "anyOf", "oneOf"):
        if keyword in out:
            out[keyword] = [strict(branch) for branch in out[keyword]]
    return out


# OpenAPI v3.0 schema objects are JSON Schema draft 4 with extensions (x-kubernetes-*), which jsonschema ignores
CRD_VALIDATORS = {
    kind: jsonschema.Draft4Validator(strict(json.loads((K8S / "crd-schemas" / f"{kind}.json").read_text())))
    for kind in ("RayCluster", "RayJob", "RayCronJob")
}


def validation_errors(manifest: dict) -> list[str]:
    """KubeRay kinds against their CRD's schema; core kinds against Kubernetes' own (kubernetes-validate)."""
    if manifest["apiVersion"] == "ray.io/v1":
        errors = CRD_VALIDATORS[manifest["kind"]].iter_errors(manifest)
        return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in errors]
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"Kubernetes {version}: {'.'.join(map(str, error.path))}: {error.message}")
    return errors


def test_every_manifest_validates(manifests):
    assert {manifest["kind"] for manifest in manifests.values()} == {"RayJob", "RayCronJob", "RayCluster", "CronJob"}
    for filename, manifest in manifests.items():
        assert validation_errors(manifest) == [], filename


def worker_group(spec: dict) -> dict:
    return spec["workerGroupSpecs"][0]


BREAKAGES = {  # name: (file, damage, the error it must cause)
    "misspelt field": (
        "rayjob.yaml",
        lambda m: worker_group(m["spec"]["rayClusterSpec"]).update(maxReplica=4),
        "'maxReplica' was unexpected",
    ),
    "wrong type": ("raycronjob.yaml", lambda m: m["spec"].update(schedule=2), "2 is not of type 'string'"),
    "missing required field": (
        "raycluster.yaml",
        lambda m: worker_group(m["spec"]).pop("groupName"),
        "'groupName' is a required property",
    ),
    "misspelt pod field": (
        "rayjob.yaml",
        lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].update(container=[]),
        "'container' was unexpected",
    ),
    "misspelt core field": (
        "cronjob.yaml",
        lambda m: m["spec"].update(concurrency_policy="Forbid"),
        "'concurrency_policy' was unexpected",
    ),
    "wrong core type": (
        "cronjob.yaml",
        lambda m: m["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0].update(command="ray job submit"),
        "'ray job submit' is not of type 'array'",
    ),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_manifest_fails_validation(breakage):
    filename, damage, expected = BREAKAGES[breakage]
    manifest = copy.deepcopy(render.render(render.load_values([]))[filename])
    damage(manifest)
    errors = validation_errors(manifest)
    assert any(expected in error for error in errors), errors


@pytest.mark.skipif(not SHARED_CRDS.is_dir(), reason="no ../shared/kuberay-crds beside this checkout")
def test_vendored_crd_schemas_are_the_shared_crds():
    for crd_file in sorted(SHARED_CRDS.glob("ray.io_*.yaml")):
        crd = yaml.load(crd_file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        (v1,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
        vendored = K8S / "crd-schemas" / f"{crd['spec']['names']['kind']}.json"
        assert json.loads(vendored.read_text()) == v1["schema"]["openAPIV3Schema"], crd_file.name


# --- what the manifests run --------------------------------------------------------------------------------------


def pod_specs(node) -> list[dict]:
    """Every pod spec (a mapping with containers) anywhere in a manifest."""
    if isinstance(node, dict):
        own = [node] if isinstance(node.get("containers"), list) else []
        return own + [spec for value in node.values() for spec in pod_specs(value)]
    if isinstance(node, list):
        return [spec for item in node for spec in pod_specs(item)]
    return []


def parse_job_command(command: list[str]):
    """The job's own parser reads the command line (argparse exits on an unknown flag or a bad value)."""
    assert command[:2] == ["python", "jobs/caption_dataset.py"]
    return caption_cli.build_parser().parse_args(command[2:])


def test_every_run_is_the_entrypoint_waiting_out_a_crashed_runs_lease(values, manifests):
    entrypoint = shlex.split(values["entrypoint"])
    args = parse_job_command(entrypoint)
    assert args.input.startswith("s3://") and args.output.startswith("s3://")

    run = shlex.split(manifests["rayjob.yaml"]["spec"]["entrypoint"])
    assert run[: len(entrypoint)] == entrypoint
    waiting = parse_job_command(run)
    assert vars(waiting) == {**vars(args), "wait_for_lease": waiting.wait_for_lease}  # only the wait is added
    # a retry runs in a new pod: it must outwait a crashed run's lease (ttl after its last heartbeat), and no more
    assert args.lease_ttl < waiting.wait_for_lease <= args.lease_ttl + 60

    assert shlex.split(manifests["raycronjob.yaml"]["spec"]["jobTemplate"]["entrypoint"]) == run
    submit = pod_specs(manifests["cronjob.yaml"])[0]["containers"][0]["command"]
    head_service = f"http://{manifests['raycluster.yaml']['metadata']['name']}-head-svc:8265"
    assert submit == ["ray", "job", "submit", "--address", head_service, "--working-dir", ".", "--", *run]


@pytest.mark.parametrize(
    "entrypoint, error",
    [
        ("python jobs/caption_dataset.py --input s3://a/ --output s3://b/ --wait-for-lease 60", "leave out --wait-for-lease"),
        ("python jobs/caption_dataset.py --input s3://a/ --output s3://b/ --wait-for 60", "leave out --wait-for-lease"),
        ("python -u jobs/caption_dataset.py --input s3://a/ --output s3://b/", "entrypoint must start with"),
    ],
)
def test_an_entrypoint_the_wait_cannot_be_derived_for_is_refused(entrypoint, error):
    values = render.load_values([])
    values["entrypoint"] = entrypoint
    with pytest.raises(ValueError, match=error):
        render.render(values)


def test_one_cluster_shape_for_rayjob_raycronjob_and_raycluster(manifests):
    on_demand = manifests["rayjob.yaml"]["spec"]
    assert manifests["raycronjob.yaml"]["spec"]["jobTemplate"] == on_demand
    cluster = copy.deepcopy(on_demand["rayClusterSpec"])
    assert cluster.pop("authOptions")["mode"] == "token"
    long_lived = copy.deepcopy(manifests["raycluster.yaml"]["spec"])
    for container in [container for spec in pod_specs(long_lived) for container in spec["containers"]]:
        # the fallback carries the token itself (older KubeRay)
        container["env"] = [env for env in container["env"] if not env["name"].startswith("RAY_AUTH_")]
    assert long_lived == cluster


def test_the_rayjob_runs_on_gpu_workers_and_cleans_up(values, manifests):
    spec = manifests["rayjob.yaml"]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == values["job"]["ttlSecondsAfterFinished"]
    assert spec["activeDeadlineSeconds"] == values["job"]["activeDeadlineSeconds"]
    workers = worker_group(spec["rayClusterSpec"])
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    (worker,) = workers["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == values["gpuWorkers"]["gpusPerWorker"] >= 1
    assert spec["rayClusterSpec"]["rayVersion"] == ray_pin()
    schedule = manifests["raycronjob.yaml"]["spec"]
    assert (schedule["schedule"], schedule["timeZone"]) == (values["schedule"], values["timeZone"])


def test_credentials_come_from_secrets_and_pods_run_as_non_root(values, manifests):
    for filename, manifest in manifests.items():
        specs = pod_specs(manifest)
        assert specs, filename
        for spec in specs:
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
            for container in spec["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False  # no sudo to root either
                env = {variable["name"]: variable for variable in container["env"]}
                for name, variable in env.items():
                    if SECRET_LOOKING.search(name):
                        assert "value" not in variable and "secretKeyRef" in variable["valueFrom"], (filename, name)
                if container["name"].startswith("ray-"):
                    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == values["s3"]["secret"]
    submitter = pod_specs(manifests["cronjob.yaml"])[0]["containers"][0]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in submitter["env"]  # auth stays on: it brings the token
    authentication = manifests["rayjob.yaml"]["spec"]["rayClusterSpec"]["authOptions"]
    assert authentication == {"mode": "token", "secretName": values["rayAuthSecret"]}


def test_render_writes_the_manifests(tmp_path):
    assert render.main(["--values", str(K8S / "overlays" / "example.yaml"), "--out", str(tmp_path)]) == 0
    expected = render.render(render.load_values([K8S / "overlays" / "example.yaml"]))
    written = {path.name: yaml.safe_load(path.read_text()) for path in tmp_path.iterdir()}
    assert written == expected


def test_an_unknown_setting_is_refused(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("gpuWorkers:\n  replica: 8\n")
    with pytest.raises(ValueError, match="unknown setting 'gpuWorkers.replica'"):
        render.load_values([typo])


# --- README.md ---------------------------------------------------------------------------------------------------


def readme_section(title: str) -> str | None:
    text = README.read_text() if README.exists() else ""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else None


def commands(markdown: str) -> list[list[str]]:
    """The command lines of the fenced code blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", markdown, re.MULTILINE | re.DOTALL)  # list items indent
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [tokens for tokens in (shlex.split(line, comments=True) for line in lines) if tokens]


def contains(tokens: list[str], part: list[str]) -> bool:
    return any(tokens[i : i + len(part)] == part for i in range(len(tokens) - len(part) + 1))


def test_the_readme_documents_the_manifests_command_line():
    deploy = (readme_section("Run on Kubernetes") or "") + (readme_section("Schedule it") or "")
    documented = commands(deploy)
    entrypoint = shlex.split(render.load_values([])["entrypoint"])
    assert any(contains(tokens, entrypoint) for tokens in documented), "README shows a different job command line"

    renders = [tokens for tokens in documented if tokens[:2] == ["python", "infra/k8s/render.py"]]
    assert renders, "README does not render the manifests"
    out = {str(render.build_parser().parse_args(tokens[2:]).out) for tokens in renders}
    applied = [token for tokens in documented for token in tokens if token.startswith(tuple(out)) and token.endswith(".yaml")]
    assert {Path(token).name for token in applied} == set(render.render(render.load_values([])))


# --- the image ---------------------------------------------------------------------------------------------------


def ray_pin() -> str:
    return re.search(r'"ray\[[^]]*\]==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "infra" / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_image_is_ray_pinned_gpu_non_root_and_secret_free():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", f"rayproject/ray:{ray_pin()}-py311-gpu")
    assert render.load_values([])["rayVersion"] == ray_pin()  # the clusters' Ray is the image's
    users = [argument for instruction, argument in instructions if instruction == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    for instruction, argument in instructions:
        if instruction in ("ENV", "ARG"):
            assert not SECRET_LOOKING.search(argument), argument
    installs = [argument for instruction, argument in instructions if instruction == "RUN" and "pip install" in argument]
    assert installs == ["pip install --no-cache-dir ."]  # the package alone: no test extra, no dev tools
    copied = " ".join(argument for instruction, argument in instructions if instruction == "COPY")
    for needed in ("pyproject.toml", "fms_smolvlm/", "pipeline/", "jobs/"):
        assert needed in copied


# --- the local S3 endpoint ---------------------------------------------------------------------------------------


def test_local_s3_serves_the_shards_and_prints_a_working_command(tmp_path):
    shards = tmp_path / "shards"
    (shards / "folder-shard").mkdir(parents=True)
    (shards / "a.tar").write_bytes(b"tar bytes")
    (shards / "folder-shard" / "cat.jpg").write_bytes(b"jpeg bytes")
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "infra" / "local" / "local_s3.py"), "--shards", str(shards), "--port", "0"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        printed = [server.stdout.readline() for _ in range(3)]
        args = parse_job_command(shlex.split(printed[2]))
        fs = s3fs.S3FileSystem(**args.storage_options)
        uploaded = sorted(path.removeprefix(args.input.removeprefix("s3://")) for path in fs.find(args.input))
        assert uploaded == ["a.tar", "folder-shard/cat.jpg"]
        assert args.output.startswith("s3://")
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
