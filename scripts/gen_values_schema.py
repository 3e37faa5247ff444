"""Generate deploy/helm/hearth/values.schema.json from the chart's values.yaml.

    .venv/bin/python scripts/gen_values_schema.py           # write it
    .venv/bin/python scripts/gen_values_schema.py --check   # exit 1 when stale

Helm validates every install, upgrade, lint and template against this schema, so a
misspelt value (`replica: 3`, `gateway.metricPort`) fails with the value's path instead
of being silently ignored. Every object of values.yaml is closed (additionalProperties:
false) except the free-form maps listed below (labels, annotations, env, Kubernetes
objects passed through); optional keys the templates read without a default are added
explicitly. Types follow the defaults; a few values get an enum.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "hearth"
OUT = CHART / "values.schema.json"

# Maps whose keys are the operator's (or Kubernetes objects passed through verbatim).
FREE_FORM = {
    "config.extra", "tracing.resourceAttributes", "serviceAccount.annotations", "podLabels", "podAnnotations",
    "nodeSelector", "affinity", "podSecurityContext", "containerSecurityContext", "serviceMonitor.labels",
    "prometheusRule.labels", "dashboards.labels", "dashboards.annotations", "ingress.annotations",
    "gateway.service.annotations", "edge.service.annotations", "gateway.probes.startup", "gateway.probes.readiness", "gateway.probes.liveness",
    "grpcProbes.startup", "grpcProbes.readiness", "grpcProbes.liveness", "backup.resources",
    "networkPolicy.peers",
}
FREE_FORM_SUFFIXES = (".resources", ".env", ".image")
# Optional keys of every component block (read with `default` in the templates).
COMPONENT_OPTIONAL = {
    "env": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
    "secretEnv": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "secretName", "secretKey"],
        "properties": {k: {"type": "string"} for k in ("name", "secretName", "secretKey")}}},
    "image": {"type": "object"},
    "nodeSelector": {"type": "object"},
    "affinity": {"type": "object"},
    "tolerations": {"type": "array"},
}
AUTOSCALING_OPTIONAL = {"targetMemoryUtilizationPercentage": {"type": "number", "minimum": 1, "maximum": 100}}
ENUMS = {
    "storage.backend": ["postgres", "sqlite"],
    "config.logLevel": ["DEBUG", "INFO", "WARNING", "ERROR"],
    "tracing.protocol": ["grpc", "http/protobuf"],
    "image.pullPolicy": ["Always", "IfNotPresent", "Never"],
    "gateway.service.type": ["ClusterIP", "NodePort", "LoadBalancer"],
}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
# Maps with a fixed key set whose default is empty: the schema is written out here.
_ADMISSION_SPEC = {"type": "object", "additionalProperties": False,
                   "required": ["maxInFlight", "maxQueue", "queueTimeoutSeconds"],
                   "properties": {"maxInFlight": {"type": "integer", "minimum": 1},
                                  "maxQueue": {"type": "integer", "minimum": 0},
                                  "queueTimeoutSeconds": {"type": "number", "minimum": 0, "maximum": 60}}}
EXPLICIT = {
    # A negative wait (review29), or one past PostgreSQL's lock_timeout (an int of ms, review30),
    # would fail the provisioning Job only when it runs: refused at `helm install` instead.
    # 0 means the command's own default (10 s).
    "storage.postgres.provisionRoles.lockTimeoutSeconds": {"type": "number", "minimum": 0, "maximum": 2147483},
    # `provision-roles --service`: only the four services' names, each once.
    "storage.postgres.provisionRoles.services": {"type": "array", "uniqueItems": True, "items": {
        "type": "string", "enum": ["clustering", "attribution", "privacy", "feedback"]}},
    # `anyone` (no `from`) or a list of NetworkPolicy peers; the template refuses [] with
    # a message saying what to write (session 32: [] used to mean anyone).
    "networkPolicy.gatewayFrom": {"anyOf": [{"type": "string", "enum": ["anyone"]}, {"type": "array"}]},
    "edge.from": {"anyOf": [{"type": "string", "enum": ["anyone"]}, {"type": "array"}]},
    "rolloutWebhook.from": {"anyOf": [{"type": "string", "enum": ["anyone"]}, {"type": "array"}]},
    "gateway.admission.perService": {"type": "object", "additionalProperties": False, "properties": {
        service: _ADMISSION_SPEC for service in ("clustering", "attribution", "privacy", "feedback")}},
    # Expected bulk readers (session 35): principal -> its own mass_household_reads threshold,
    # a number of households >= 1 (never 0 or unlimited), refused at `helm install`.
    "services.privacy.bulkReaders": {"type": "object", "propertyNames": {"minLength": 1},
                                     "additionalProperties": {"type": "integer", "minimum": 1}},
}


def _is_free(path: str) -> bool:
    return path in FREE_FORM or path.endswith(FREE_FORM_SUFFIXES)


def schema_of(value, path: str) -> dict:
    if path in EXPLICIT:
        return EXPLICIT[path]
    if path in ENUMS:
        return {"type": "string", "enum": ENUMS[path]}
    if path.endswith(("Port", ".port")) and isinstance(value, int):
        return dict(PORT)
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, (int, float)):
        return {"type": "number"}
    if isinstance(value, str):
        # Numbers given as strings in values.yaml ("0.1") may come back as numbers from --set.
        return {"type": ["string", "number"]} if _looks_numeric(value) else {"type": "string"}
    if isinstance(value, list):
        return {"type": "array"}
    if isinstance(value, dict):
        if _is_free(path):
            return {"type": "object"}
        properties = {k: schema_of(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        if _is_component(path):
            properties.update({k: s for k, s in COMPONENT_OPTIONAL.items() if k not in properties})
            auto = properties.get("autoscaling")
            if auto and "properties" in auto:
                auto["properties"].update(AUTOSCALING_OPTIONAL)
        return {"type": "object", "additionalProperties": False, "properties": properties}
    if value is None:
        return {}
    raise TypeError(f"{path}: unsupported default {value!r}")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_component(path: str) -> bool:
    return path == "gateway" or (path.startswith("services.") and path.count(".") == 1)


def build() -> str:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = {"$schema": "https://json-schema.org/draft-07/schema#", "title": "Hearth chart values",
              **schema_of(values, "")}
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    text = build()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"stale: {OUT} (run scripts/gen_values_schema.py)", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(json.dumps({"written": str(OUT)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
