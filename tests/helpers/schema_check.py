#!/usr/bin/env python3
"""Validates YAML policy files against docs/policy.schema.json with the `jsonschema` package
(what yaml-language-server does in an editor). Prints one JSON line per file."""
import json, sys

import jsonschema, yaml

schema = json.load(open(sys.argv[1]))
jsonschema.Draft7Validator.check_schema(schema)
v = jsonschema.Draft7Validator(schema)
for path in sys.argv[2:]:
    doc = yaml.safe_load(open(path)) or {}
    errors = sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))
    print(json.dumps({"file": path, "errors": [".".join(map(str, e.absolute_path)) + ": " + e.message for e in errors]}))
