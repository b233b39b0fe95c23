"""Render the captioning job's Kubernetes manifests from one values file.

    python infra/k8s/render.py --values my-values.yaml --out build/k8s

writes
    rayjob.yaml      RayJob: a run now, on a cluster of its own that is deleted when the run ends
    raycronjob.yaml  RayCronJob: the same RayJob every night (KubeRay >= 1.6, feature gate RayCronJob)
    raycluster.yaml  RayCluster: a long-lived cluster, for older KubeRay ...
    cronjob.yaml     CronJob: ... whose pod submits the same run to it nightly with `ray job submit`

Settings live in values.yaml beside this script; each --values file overrides it key by key. The Ray head and
GPU worker groups are built once here and shared by the RayJob, the RayCronJob and the RayCluster.

Every run is the entrypoint plus `--wait-for-lease`, just above the entrypoint's `--lease-ttl`: a retry runs in a
new pod, where a crashed run's hold on the output ends only when its lease expires, so it waits for that instead
of refusing.
"""

import argparse
import math
import runpy
import shlex
import sys
from pathlib import Path

import yaml

DEFAULTS = Path(__file__).resolve().parent / "values.yaml"
JOB_SCRIPT = "jobs/caption_dataset.py"
PROJECT = Path(__file__).resolve().parents[2]
# a crashed run's lease expires --lease-ttl after its last heartbeat, which came before the retry started; the
# margin covers clock skew between nodes and a slow store
LEASE_WAIT_MARGIN_S = 30
APP_DIR = "/home/ray/app"  # where infra/docker/Dockerfile puts the project, jobs/ included
RAY_USER, RAY_GROUP = 1000, 100  # user `ray` and group `users` of the rayproject/ray images
DASHBOARD_PORT = 8265
HEAD_PORTS = [
    {"name": "gcs-server", "containerPort": 6379},
    {"name": "dashboard", "containerPort": DASHBOARD_PORT},
    {"name": "client", "containerPort": 10001},
]
GPU = "nvidia.com/gpu"
# GPU node pools are commonly tainted so that only pods that need a GPU land there
GPU_TOLERATIONS = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]


def load_values(overrides: list[Path]) -> dict:
    values = yaml.safe_load(DEFAULTS.read_text())
    for path in overrides:
        merge(values, yaml.safe_load(path.read_text()) or {}, str(path))
    return values


def merge(base: dict, override: dict, source: str, prefix: str = "") -> None:
    """Override ``base`` in place, key by key. A key that ``base`` lacks is a typo, not a new setting."""
    for key, value in override.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ValueError(f"{source}: unknown setting {name!r} (the settings are those of {DEFAULTS})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {name!r} must be a mapping, as in {DEFAULTS}")
            merge(base[key], value, source, f"{name}.")
        else:
            base[key] = value


def render(values: dict) -> dict[str, dict]:
    """File name -> manifest."""
    return {
        "rayjob.yaml": ray_job(values),
        "raycronjob.yaml": ray_cron_job(values),
        "raycluster.yaml": ray_cluster(values),
        "cronjob.yaml": submit_cron_job(values),
    }


# --- the objects -----------------------------------------------------------------------------------------------


def ray_job(values: dict) -> dict:
    return custom_resource(values, "RayJob", values["name"], ray_job_spec(values))


def ray_cron_job(values: dict) -> dict:
    spec = {"schedule": values["schedule"], "timeZone": values["timeZone"], "jobTemplate": ray_job_spec(values)}
    return custom_resource(values, "RayCronJob", nightly_name(values), spec)


def ray_cluster(values: dict) -> dict:
    # No authOptions here: this fallback serves KubeRay older than 1.6, and authOptions came in 1.5.1. The token
    # reaches Ray the way it does on any KubeRay, through RAY_AUTH_MODE and RAY_AUTH_TOKEN in every Ray container.
    return custom_resource(values, "RayCluster", cluster_name(values), ray_cluster_spec(values, token_env(values)))


def submit_cron_job(values: dict) -> dict:
    submit = [
        "ray", "job", "submit",
        "--address", f"http://{cluster_name(values)}-head-svc:{DASHBOARD_PORT}",  # KubeRay's head Service
        "--working-dir", ".",
        "--",
        *job_command(values),
    ]
    # `ray job submit` streams the run's logs and exits non-zero if it fails, so the Job's status is the run's
    container = {
        "name": "submit",
        "image": values["image"],
        "workingDir": APP_DIR,
        "command": submit,
        "env": token_env(values),
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    pod = {"metadata": {"labels": labels(values)}, "spec": {**pod_spec([container]), "restartPolicy": "Never"}}
    job = {
        "backoffLimit": 0,  # a failed run is not retried at once: the next night's run resumes where it stopped
        "activeDeadlineSeconds": values["job"]["activeDeadlineSeconds"],
        "ttlSecondsAfterFinished": values["job"]["ttlSecondsAfterFinished"],
        "template": pod,
    }
    spec = {
        "schedule": values["schedule"],
        "timeZone": values["timeZone"],
        # Kubernetes skips a night while the last run is still going; the output lease covers every other overlap
        "concurrencyPolicy": "Forbid",
        "jobTemplate": {"metadata": {"labels": labels(values)}, "spec": job},
    }
    return {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": metadata(values, nightly_name(values)), "spec": spec}


# --- the shared parts ------------------------------------------------------------------------------------------


def ray_job_spec(values: dict) -> dict:
    cluster = ray_cluster_spec(values, [])
    # Token auth stays on. KubeRay (>= 1.5.1) gives every Ray container and the submitter RAY_AUTH_MODE=token and
    # RAY_AUTH_TOKEN from this Secret, and uses the token itself to follow the run through the dashboard. (A
    # KubeRay that predates secretName generates a Secret of its own instead, which works the same.)
    cluster["authOptions"] = {"mode": "token", "secretName": values["rayAuthSecret"]}
    return {
        "entrypoint": shlex.join(job_command(values)),
        # the entrypoint's paths are relative to the project, as with `ray job submit --working-dir .`
        "runtimeEnvYAML": f"working_dir: {APP_DIR}",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": values["job"]["ttlSecondsAfterFinished"],
        "activeDeadlineSeconds": values["job"]["activeDeadlineSeconds"],
        "rayClusterSpec": cluster,
    }


def job_command(values: dict) -> list[str]:
    """The entrypoint, waiting for the output's lease a little longer than its ttl."""
    command = shlex.split(values["entrypoint"])
    if command[:2] != ["python", JOB_SCRIPT]:
        raise ValueError(f"entrypoint must start with `python {JOB_SCRIPT}`, got {values['entrypoint']!r}")
    parser = runpy.run_path(str(PROJECT / JOB_SCRIPT))["build_parser"]()
    parser.set_defaults(wait_for_lease=None)  # tells a --wait-for-lease in the entrypoint from the default
    job = parser.parse_args(command[2:])  # the job's own parser: a bad flag fails here, not in the cluster
    if job.wait_for_lease is not None:
        raise ValueError("entrypoint: leave out --wait-for-lease; render.py sets it just above --lease-ttl")
    return [*command, "--wait-for-lease", str(math.ceil(job.lease_ttl) + LEASE_WAIT_MARGIN_S)]


def ray_cluster_spec(values: dict, extra_env: list[dict]) -> dict:
    head, workers = values["head"], values["gpuWorkers"]
    head_resources = {"cpu": head["cpu"], "memory": head["memory"]}
    worker_resources = {"cpu": workers["cpu"], "memory": workers["memory"]}
    head_container = ray_container(values, "ray-head", head_resources, extra_env)
    head_container["ports"] = HEAD_PORTS
    worker_container = ray_container(values, "ray-worker", worker_resources, extra_env)
    worker_container["resources"]["limits"][GPU] = workers["gpusPerWorker"]
    worker_pod = {**pod_spec([worker_container]), "tolerations": GPU_TOLERATIONS}
    return {
        "rayVersion": values["rayVersion"],
        "headGroupSpec": {
            "rayStartParams": {},
            "template": {"metadata": {"labels": labels(values)}, "spec": pod_spec([head_container])},
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu",
                "replicas": workers["replicas"],
                "minReplicas": workers["minReplicas"],
                "maxReplicas": workers["maxReplicas"],
                "rayStartParams": {},  # KubeRay passes the container's GPU limit to `ray start --num-gpus`
                "template": {"metadata": {"labels": labels(values)}, "spec": worker_pod},
            }
        ],
    }


def ray_container(values: dict, name: str, resources: dict, extra_env: list[dict]) -> dict:
    return {
        "name": name,
        "image": values["image"],
        "env": storage_env(values) + extra_env,
        # requests = limits: Ray sizes its scheduler and object store from what the container may use
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": {"allowPrivilegeEscalation": False},
    }


def storage_env(values: dict) -> list[dict]:
    """S3 credentials from the Secret; s3fs (through botocore) reads them from these variables."""
    secret = values["s3"]["secret"]
    return [
        secret_env("AWS_ACCESS_KEY_ID", secret, "AWS_ACCESS_KEY_ID"),
        secret_env("AWS_SECRET_ACCESS_KEY", secret, "AWS_SECRET_ACCESS_KEY"),
        secret_env("AWS_ENDPOINT_URL", secret, "AWS_ENDPOINT_URL", optional=True),  # MinIO, Ceph, ...: not AWS
        {"name": "AWS_DEFAULT_REGION", "value": values["s3"]["region"]},
    ]


def token_env(values: dict) -> list[dict]:
    """Ray token authentication by hand: Ray processes and `ray job submit` read the token from RAY_AUTH_TOKEN."""
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        secret_env("RAY_AUTH_TOKEN", values["rayAuthSecret"], "auth_token"),
    ]


def secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict:
    reference = {"name": secret, "key": key, **({"optional": True} if optional else {})}
    return {"name": name, "valueFrom": {"secretKeyRef": reference}}


def pod_spec(containers: list[dict]) -> dict:
    security = {"runAsNonRoot": True, "runAsUser": RAY_USER, "runAsGroup": RAY_GROUP, "fsGroup": RAY_GROUP}
    return {"securityContext": security, "containers": containers}


def custom_resource(values: dict, kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": kind, "metadata": metadata(values, name), "spec": spec}


def metadata(values: dict, name: str) -> dict:
    return {"name": name, "labels": labels(values)}


def labels(values: dict) -> dict:
    return {"app.kubernetes.io/name": "fms-smolvlm", "app.kubernetes.io/instance": values["name"]}


def nightly_name(values: dict) -> str:
    return f"{values['name']}-nightly"


def cluster_name(values: dict) -> str:
    return f"{values['name']}-cluster"


class ExplicitDumper(yaml.SafeDumper):
    """Writes a value used twice (the token variables of head and workers) twice, not as a YAML alias."""

    def ignore_aliases(self, data) -> bool:
        return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="render.py", description="Render the KubeRay manifests of the captioning job.")
    parser.add_argument(
        "--values", type=Path, action="append", default=[], help="YAML overriding values.yaml (repeatable; later files win)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("build/k8s"), help="directory for the manifests (default: %(default)s)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        manifests = render(load_values(args.values))
    except ValueError as error:
        parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    for filename, manifest in manifests.items():
        # wide lines: the entrypoint stays on one line, greppable and as README.md shows it
        (args.out / filename).write_text(yaml.dump(manifest, Dumper=ExplicitDumper, sort_keys=False, width=10_000))
        print(args.out / filename)
    return 0


if __name__ == "__main__":
    sys.exit(main())
