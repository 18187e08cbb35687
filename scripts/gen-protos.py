#!/usr/bin/env python3
"""Writes crates/wire/proto/gitaly/*.proto from tables of protocol facts (TSV files).

The TSVs list every message field (name, number, type, label, oneof), every enum value and
every RPC (streaming flags, request and response types) of the Gitaly protocol. From those
facts this script writes our own .proto files: package `gitaly`, the same names, numbers and
types, hence wire-compatible. The generated files are committed; the build never reads the
TSVs. Re-run after the facts change, naming the directory that holds gitaly-messages.tsv,
gitaly-enums.tsv and gitaly-rpcs.tsv:

    scripts/gen-protos.py FACTS_DIR
"""
import collections
import csv
import os
import sys

if len(sys.argv) != 2:
    sys.exit("usage: scripts/gen-protos.py FACTS_DIR (the directory of the protocol's TSV files)")
shared = sys.argv[1]
out_dir = os.path.join(os.path.dirname(__file__), "..", "crates", "wire", "proto", "gitaly")


def rows(name):
    with open(os.path.join(shared, name), newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


fields = rows("gitaly-messages.tsv")
enum_values = rows("gitaly-enums.tsv")
rpcs = rows("gitaly-rpcs.tsv")

WELL_KNOWN = {
    "google.protobuf.Timestamp": "google/protobuf/timestamp.proto",
    "google.protobuf.Duration": "google/protobuf/duration.proto",
    "google.protobuf.UInt32Value": "google/protobuf/wrappers.proto",
    "google.protobuf.BoolValue": "google/protobuf/wrappers.proto",
}
# etcd's raftpb.Message travels as an embedded message; an embedded message and `bytes` share
# the length-delimited wire type, so we carry it as opaque bytes.
OPAQUE = {"raftpb.Message": "bytes"}

messages = collections.OrderedDict()  # full name -> file
for row in fields:
    messages.setdefault(row["message"], row["proto_file"])
enums = collections.OrderedDict()
for row in enum_values:
    enums.setdefault(row["enum"], row["proto_file"])

defined_in = {}
defined_in.update(messages)
defined_in.update(enums)

fields_of = collections.defaultdict(list)
for row in fields:
    fields_of[row["message"]].append(row)
values_of = collections.defaultdict(list)
for row in enum_values:
    values_of[row["enum"]].append(row)


def parent_of(name):
    return name.rsplit(".", 1)[0]


def short(name):
    return name.rsplit(".", 1)[1]


def children(parent):
    """Messages and enums directly nested in `parent` (a message full name)."""
    msgs = [m for m in messages if parent_of(m) == parent]
    ens = [e for e in enums if parent_of(e) == parent]
    return msgs, ens


def type_ref(t, file, imports):
    if t in OPAQUE:
        return OPAQUE[t]
    if t in WELL_KNOWN:
        imports.add(WELL_KNOWN[t])
        return t
    if t.startswith("gitaly."):
        other = defined_in.get(t)
        if other is None:
            raise SystemExit(f"unknown type {t}")
        if other != file:
            imports.add("gitaly/" + other)
        return "." + t
    return t


def render_enum(name, indent):
    pad = "  " * indent
    out = [f"{pad}enum {short(name)} {{"]
    for v in sorted(values_of[name], key=lambda r: int(r["number"])):
        if v["value_name"] == "(reserved)":
            out.append(f"{pad}  reserved {v['number']};")
        else:
            out.append(f"{pad}  {v['value_name']} = {v['number']};")
    out.append(f"{pad}}}")
    return out


def render_field(row, file, imports, pad):
    t = type_ref(row["type"], file, imports)
    label = row["label"]
    if label.startswith("map<"):
        key, _, _ = label[4:-1].partition(",")
        return f"{pad}map<{key}, {t}> {row['field']} = {row['number']};"
    prefix = "repeated " if label == "repeated" else ""
    return f"{pad}{prefix}{t} {row['field']} = {row['number']};"


def render_message(name, file, imports, indent):
    pad = "  " * indent
    out = [f"{pad}message {short(name)} {{"]
    msgs, ens = children(name)
    for e in ens:
        out += render_enum(e, indent + 1)
    for m in msgs:
        out += render_message(m, file, imports, indent + 1)
    oneofs = collections.OrderedDict()
    for row in fields_of[name]:
        if row["field"] == "(empty)":
            continue
        if row["field"] == "(reserved)":
            out.append(f"{pad}  reserved {row['number']};")
            continue
        if row["oneof"]:
            oneofs.setdefault(row["oneof"], []).append(row)
            continue
        out.append(render_field(row, file, imports, pad + "  "))
    for oneof, members in oneofs.items():
        out.append(f"{pad}  oneof {oneof} {{")
        for row in members:
            out.append(render_field(row, file, imports, pad + "    "))
        out.append(f"{pad}  }}")
    out.append(f"{pad}}}")
    return out


files = sorted(set(messages.values()) | set(enums.values()) | {r["proto_file"] for r in rpcs})
os.makedirs(out_dir, exist_ok=True)
for file in files:
    imports = set()
    body = []
    services = collections.OrderedDict()
    for r in rpcs:
        if r["proto_file"] == file:
            services.setdefault(r["service"], []).append(r)
    for service, methods in services.items():
        body.append(f"service {short(service)} {{")
        for m in methods:
            req = type_ref(m["request_message"], file, imports)
            resp = type_ref(m["response_message"], file, imports)
            cs = "stream " if m["client_streaming"] == "1" else ""
            ss = "stream " if m["server_streaming"] == "1" else ""
            body.append(f"  rpc {m['method']}({cs}{req}) returns ({ss}{resp});")
        body.append("}")
        body.append("")
    for e, f in enums.items():
        if f == file and parent_of(e) == "gitaly":
            body += render_enum(e, 0)
            body.append("")
    for m, f in messages.items():
        if f == file and parent_of(m) == "gitaly":
            body += render_message(m, file, imports, 0)
            body.append("")
    header = [
        "// Generated by scripts/gen-protos.py from the Gitaly protocol facts; do not edit.",
        'syntax = "proto3";',
        "",
        "package gitaly;",
        "",
    ]
    header += [f'import "{i}";' for i in sorted(imports)]
    if imports:
        header.append("")
    with open(os.path.join(out_dir, file), "w") as f:
        f.write("\n".join(header + body).rstrip() + "\n")
print(f"wrote {len(files)} files to {os.path.normpath(out_dir)}")
