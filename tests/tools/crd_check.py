"""Checks Policy documents against the openAPIV3Schema of the Policy CRD, as the API server
would, for tests/manifests.rs (which runs it with the Python of the tools venv).

    crd_check.py to-json                 YAML documents on stdin -> one JSON array on stdout
    crd_check.py schema CRD.yaml FILE... one JSON object per FILE: {"file", "errors": [...]}

The API server's checks are emulated:
- structural schema + Strict field validation (kubectl's default): every object schema with
  `properties` is closed, as if it had `additionalProperties: false` (a structural schema may
  not say so itself; the API server prunes, and Strict turns a pruned field into an error);
- `nullable`; `x-kubernetes-list-type: map` (unique keys); `x-kubernetes-validations` (CEL,
  evaluated with cel-python, self = the value the rule is written on);
- `pattern` is matched with Python's re after checking it compiles as RE2 (the API server's
  regex engine), so a pattern that Kubernetes could not use fails here too.
Error paths are written as the agent writes them: relative to `spec` for what is under it
(`rules[0].ports[0].port`), `spec`, `metadata.name`..., and `(root)` for the document itself.
"""

import copy
import json
import sys

import celpy
import jsonschema
import re2
import yaml


def closed(schema):
    """A copy of an OpenAPI v3 schema as JSON Schema draft 4 with the API server's rules."""
    schema = copy.deepcopy(schema)

    def walk(s):
        if not isinstance(s, dict):
            return
        if "pattern" in s:
            re2.compile(s["pattern"])  # raises if the API server could not compile it
        if s.get("nullable"):
            t = s.get("type")
            if t is not None:
                s["type"] = [t, "null"]
        if (
            s.get("type") == "object"
            and "properties" in s
            and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")
        ):
            s["additionalProperties"] = False
        for key in ("properties",):
            for sub in s.get(key, {}).values():
                walk(sub)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(s.get(key), dict):
                walk(s[key])
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in s.get(key, []):
                walk(sub)

    walk(schema)
    return schema


def fmt_path(path):
    parts = list(path)
    if parts and parts[0] == "spec":
        parts = parts[1:]
        if not parts:
            return "spec"
    elif not parts:
        return "(root)"
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


CEL = celpy.Environment()


def extra_checks(schema, value, path, errors):
    """CEL rules and list-map keys, walking the value along the schema."""
    if not isinstance(schema, dict):
        return
    for rule in schema.get("x-kubernetes-validations", []):
        try:
            program = CEL.program(CEL.compile(rule["rule"]))
            result = program.evaluate({"self": celpy.json_to_cel(value)})
            ok = bool(result) if isinstance(result, (bool, celpy.celtypes.BoolType)) else False
        except Exception as e:  # an evaluation error fails the rule, as in the API server
            ok = False
        if not ok:
            errors.append({"path": fmt_path(path), "message": rule.get("message", rule["rule"])})
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                extra_checks(sub, value[key], path + [key], errors)
        if isinstance(schema.get("additionalProperties"), dict):
            for key, v in value.items():
                extra_checks(schema["additionalProperties"], v, path + [key], errors)
    if isinstance(value, list):
        keys = schema.get("x-kubernetes-list-map-keys")
        if schema.get("x-kubernetes-list-type") == "map" and keys:
            seen = {}
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                k = tuple(json.dumps(item.get(name)) for name in keys)
                if k in seen:
                    errors.append({
                        "path": fmt_path(path + [i]),
                        "message": f"duplicate entry for key {dict(zip(keys, k))} (first at [{seen[k]}])",
                    })
                else:
                    seen[k] = i
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                extra_checks(schema["items"], item, path + [i], errors)


def check(schema, raw, doc):
    errors = []
    if not isinstance(doc, dict):
        return [{"path": "(root)", "message": "not a mapping"}]
    if doc.get("apiVersion") != "tollgate.dev/v1alpha1" or doc.get("kind") != "Policy":
        errors.append({"path": "(root)", "message": "not a tollgate.dev/v1alpha1 Policy"})
    validator = jsonschema.Draft4Validator(schema)
    for e in validator.iter_errors(doc):
        errors.append({"path": fmt_path(e.absolute_path), "message": e.message})
    extra_checks(raw, doc, [], errors)
    return errors


def main():
    if sys.argv[1] == "to-json":
        json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)
        return
    assert sys.argv[1] == "schema"
    crds = [
        d for d in yaml.safe_load_all(open(sys.argv[2]))
        if d and d.get("kind") == "CustomResourceDefinition"
        and d["metadata"]["name"] == "policies.tollgate.dev"
    ]
    assert len(crds) == 1, "no (or more than one) CRD policies.tollgate.dev"
    versions = crds[0]["spec"]["versions"]
    assert [v["name"] for v in versions] == ["v1alpha1"]
    raw = versions[0]["schema"]["openAPIV3Schema"]
    schema = closed(raw)
    jsonschema.Draft4Validator.check_schema(schema)
    for path in sys.argv[3:]:
        docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
        errors = []
        if len(docs) != 1:
            errors.append({"path": "(root)", "message": f"{len(docs)} documents, expected 1"})
        else:
            errors = check(schema, raw, docs[0])
        print(json.dumps({"file": path, "errors": errors}))


if __name__ == "__main__":
    main()
