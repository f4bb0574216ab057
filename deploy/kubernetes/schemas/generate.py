"""Writes the JSON Schemas that scripts/check-deploy validates the KEDA kinds against.

KEDA's CRDs are not among the core kinds that kubernetes-validate knows. Their
structure comes from the PyPI package cloudcoil-models-keda, whose models are
generated from KEDA's CRDs. The schemas are kept in the repository, so the check
runs offline; run this again (in a virtualenv) to follow a newer KEDA:

    pip install cloudcoil-models-keda==2.16.1.0
    python deploy/kubernetes/schemas/generate.py

A CRD prunes fields it does not know, so a misspelt field would be dropped
silently by the cluster: here every object refuses unknown properties instead.
"""

import json
import pathlib

from cloudcoil.models.keda import v1alpha1

HERE = pathlib.Path(__file__).parent


def strict(node):
    if isinstance(node, dict):
        node.pop("title", None)
        node.pop("default", None)
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


for model in (v1alpha1.ScaledObject, v1alpha1.TriggerAuthentication):
    schema = strict(model.model_json_schema(by_alias=True))
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = f"KEDA keda.sh/v1alpha1 {model.__name__}, from cloudcoil-models-keda (see generate.py)"
    path = HERE / f"keda.sh_v1alpha1_{model.__name__.lower()}.json"
    path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")
