#!/usr/bin/env python3
"""Fetches a Prometheus text exposition over HTTP and parses it with the official client
library's parser (prometheus_client.parser), printing every sample as JSON:
{"samples": {"name{label=value,...}": value, ...}, "types": {"family": "counter", ...}}.
Exits non-zero if the text does not parse. Usage: parse_prometheus.py URL [TOKEN]"""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

url = sys.argv[1]
req = urllib.request.Request(url)
if len(sys.argv) > 2:
    req.add_header("Authorization", "Bearer " + sys.argv[2])
with urllib.request.urlopen(req, timeout=10) as resp:
    content_type = resp.headers.get("Content-Type", "")
    text = resp.read().decode("utf-8")
samples = {}
types = {}
for family in text_string_to_metric_families(text):
    types[family.name] = family.type
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        key = f"{s.name}{{{labels}}}" if labels else s.name
        if key in samples:
            sys.exit(f"duplicate sample {key}")
        samples[key] = s.value
print(json.dumps({"content_type": content_type, "samples": samples, "types": types}))
