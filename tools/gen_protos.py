"""Render the project's `.proto` files from the descriptors embedded in the official SDK.

The SDK (chalkcompute==2.13.11) is the wire contract: package, service, method, field names and numbers must match
it exactly. Rather than transcribe ~300 message types by hand, this tool takes the services and methods we serve
(SERVED below), computes the closure of the message and enum types they reach, and writes plain proto3 files
into `proto/`, one per original file, with only those types and methods. The result is committed; the build
never needs the SDK. Re-run it when SERVED grows:

    python tools/gen_protos.py            # in a venv with chalkcompute==2.13.11 installed
"""
import collections
import os
import sys

from google.protobuf import descriptor_pb2

# The SDK's descriptors are read exactly as the conformance test reads them.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "conformance"))
from sdk_descriptors import sdk_files  # noqa: E402

# service full name -> methods we register. A method listed here is part of the contract the conformance test
# checks; one the server does not implement yet still answers UNIMPLEMENTED naming itself.
SERVED = {
    "chalk.server.v1.AuthService": ["GetToken"],
    "chalk.server.v1.TeamService": ["GetEnv"],
    "chalk.server.v1.EnvironmentSecretsService": ["ListSecrets", "GetSecretValue", "UpsertSecret", "DeleteSecret"],
    "chalk.sandbox.v1.CustomImageService": ["GetOrBuildCustomImage", "GetCustomImage"],
    "chalk.sandbox.v1.SandboxRuntimeService": ["ExecutePython"],
    "chalk.container.v1.ContainerService": ["RunContainer", "GetContainer", "StopContainer", "ListContainers"],
    "chalk.sandbox.v2.SandboxService": [
        "CreateSandbox", "GetSandbox", "ListSandboxes", "TerminateSandbox", "SuspendSandbox", "ResumeSandbox",
    ],
    "chalk.sandbox.v2.SandboxProcessService": ["ExecCommand", "OpenSession", "GetSession", "ListSessions"],
    "chalk.sandbox.v2.SandboxFilesystemService": ["UploadFile", "DownloadFile"],
    "chalk.scalinggroup.v1.ScalingGroupManagerService": [
        "CreateScalingGroup", "UpdateScalingGroup", "GetScalingGroup", "ListScalingGroups", "DeleteScalingGroup",
        "GetScalingGroupRevision", "ListScalingGroupRevisions",
    ],
    "chalk.volume.v2.VolumeService": [
        "CreateVolume", "GetVolume", "ListVolumes", "DeleteVolume", "ListVolumeVersions", "CreateRef", "ListRefs",
        "DeleteRef", "CommitVersion", "GetCommitStatus", "RequestUploadURLs", "ListFiles", "GetFile",
    ],
    # The hosted service's v1 volume surface (its public examples populate volumes through it), over the v2 store.
    "chalk.volume.v1.VolumeService": [
        "CreateVolume", "GetVolume", "ListVolumes", "DeleteVolume", "ListFiles", "GetFile", "PutFile", "RemoveFile",
    ],
    "chalk.externalfunctioncatalog.v1.ExternalFunctionCatalogService": [
        "EnsureExternalFunction", "GetExternalFunction", "ListExternalFunctions", "DeleteExternalFunction",
        "CallExternalFunction", "GetExternalFunctionVersion", "ListExternalFunctionVersions",
    ],
    "chalk.runtime.v1.RemoteCallService": ["CallFunction"],
    "chalk.runtime.v1.AsyncRemoteCallService": ["EnqueueRemoteCall", "PollRemoteCall", "PurgeQueue"],
    "chalk.runtime.v1.FunctionQueueMetaService": ["GetRecentCalls", "GetCallResults", "GetCallCount"],
}

# Types the server sends outside any method's request/response closure (e.g. in grpc-status-details-bin).
EXTRA_TYPES = ["chalk.sandbox.v2.FilesystemErrorDetail", "chalk.volume.v2.CommitDeltasObject"]

FT = descriptor_pb2.FieldDescriptorProto
SCALAR = {v: k[5:].lower() for k, v in FT.Type.items()}


class Index:
    """Where each fully-qualified type lives: (file name, top-level type name, descriptor)."""

    def __init__(self, files):
        self.files = files
        self.types = {}
        for fd in files.values():
            for m in fd.message_type:
                self._add_msg(fd, m, fd.package, m.name)
            for e in fd.enum_type:
                self.types[f"{fd.package}.{e.name}"] = (fd.name, e.name, e)

    def _add_msg(self, fd, m, prefix, top):
        full = f"{prefix}.{m.name}"
        self.types[full] = (fd.name, top, m)
        for n in m.nested_type:
            self._add_msg(fd, n, full, top)
        for e in m.enum_type:
            self.types[f"{full}.{e.name}"] = (fd.name, top, e)


def closure(index, roots):
    """Top-level types reachable from `roots`, as {(file, top-level name)}."""
    keep, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in index.types:
            sys.exit(f"type {name} not found in the SDK descriptors")
        fname, top, _ = index.types[name]
        if (fname, top) in keep:
            continue
        keep.add((fname, top))
        pkg = index.files[fname].package
        _, _, desc = index.types[f"{pkg}.{top}"]
        if isinstance(desc, descriptor_pb2.DescriptorProto):
            stack = [desc]
            while stack:
                m = stack.pop()
                stack.extend(m.nested_type)
                for f in m.field:
                    if f.type in (FT.TYPE_MESSAGE, FT.TYPE_ENUM):
                        todo.append(f.type_name.lstrip("."))
    return keep


def render_file(fd, keep_tops, methods_by_service, index):
    pkg = fd.package
    used_files = set()
    msg_index = {}

    def idx(m, prefix):
        full = f"{prefix}.{m.name}"
        msg_index[full] = m
        for n in m.nested_type:
            idx(n, full)

    for m in fd.message_type:
        idx(m, pkg)

    def type_ref(type_name):
        full = type_name.lstrip(".")
        fname = index.types[full][0] if full in index.types else None
        if fname and fname != fd.name:
            used_files.add(fname)
        return "." + full

    def ftype(f):
        if f.type in (FT.TYPE_MESSAGE, FT.TYPE_ENUM):
            return type_ref(f.type_name)
        return SCALAR[f.type]

    def map_type(f):
        if f.label != FT.LABEL_REPEATED or f.type != FT.TYPE_MESSAGE:
            return None
        m = msg_index.get(f.type_name.lstrip("."))
        if m is not None and m.options.map_entry:
            return f"map<{ftype(m.field[0])}, {ftype(m.field[1])}>"
        return None

    def opts(f):
        o = []
        if f.options.deprecated:
            o.append("deprecated = true")
        if f.HasField("json_name") and f.json_name != camel(f.name):
            o.append(f'json_name = "{f.json_name}"')
        return f" [{', '.join(o)}]" if o else ""

    def enum(e, ind):
        out = [f"{ind}enum {e.name} {{"]
        if e.options.allow_alias:
            out.append(f"{ind}  option allow_alias = true;")
        for v in e.value:
            dep = " [deprecated = true]" if v.options.deprecated else ""
            out.append(f"{ind}  {v.name} = {v.number}{dep};")
        for r in e.reserved_range:
            out.append(f"{ind}  reserved {r.start}" + (f" to {r.end}" if r.end != r.start else "") + ";")
        out.append(f"{ind}}}")
        return out

    def message(m, ind):
        out = [f"{ind}message {m.name} {{"]
        if m.options.deprecated:
            out.append(f"{ind}  option deprecated = true;")
        for e in m.enum_type:
            out += enum(e, ind + "  ")
        for n in m.nested_type:
            if not n.options.map_entry:
                out += message(n, ind + "  ")
        done_oneofs = set()
        for f in m.field:
            real_oneof = f.HasField("oneof_index") and not f.proto3_optional
            if real_oneof:
                i = f.oneof_index
                if i in done_oneofs:
                    continue
                done_oneofs.add(i)
                out.append(f"{ind}  oneof {m.oneof_decl[i].name} {{")
                for g in m.field:
                    if g.HasField("oneof_index") and not g.proto3_optional and g.oneof_index == i:
                        out.append(f"{ind}    {ftype(g)} {g.name} = {g.number}{opts(g)};")
                out.append(f"{ind}  }}")
                continue
            mt = map_type(f)
            if mt:
                out.append(f"{ind}  {mt} {f.name} = {f.number}{opts(f)};")
                continue
            label = ""
            if f.label == FT.LABEL_REPEATED:
                label = "repeated "
            elif f.proto3_optional:
                label = "optional "
            out.append(f"{ind}  {label}{ftype(f)} {f.name} = {f.number}{opts(f)};")
        for r in m.reserved_range:
            out.append(f"{ind}  reserved {r.start}" + (f" to {r.end - 1}" if r.end - 1 != r.start else "") + ";")
        if m.reserved_name:
            out.append(f"{ind}  reserved " + ", ".join(f'"{n}"' for n in m.reserved_name) + ";")
        out.append(f"{ind}}}")
        return out

    body = []
    for s in fd.service:
        wanted = methods_by_service.get(f"{pkg}.{s.name}")
        if not wanted:
            continue
        body.append(f"service {s.name} {{")
        for mth in s.method:
            if mth.name not in wanted:
                continue
            cs = "stream " if mth.client_streaming else ""
            ss = "stream " if mth.server_streaming else ""
            body.append(f"  rpc {mth.name}({cs}{type_ref(mth.input_type)}) returns ({ss}{type_ref(mth.output_type)});")
        body.append("}")
        body.append("")
    for e in fd.enum_type:
        if e.name in keep_tops:
            body += enum(e, "")
            body.append("")
    for m in fd.message_type:
        if m.name in keep_tops:
            body += message(m, "")
            body.append("")

    head = [
        "// Generated by tools/gen_protos.py from the descriptors of chalkcompute==2.13.11: the wire contract.",
        "// Only the types reachable from the methods Compute serves are kept. Do not edit by hand.",
        'syntax = "proto3";',
        "",
        f"package {pkg};",
        "",
    ]
    for dep in sorted(used_files):
        head.append(f'import "{dep}";')
    if used_files:
        head.append("")
    return "\n".join(head + body).rstrip() + "\n"


def camel(name):
    parts = name.split("_")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "proto")
    files = sdk_files()
    index = Index(files)
    roots, service_files = [], {}
    for fd in files.values():
        for s in fd.service:
            full = f"{fd.package}.{s.name}"
            if full not in SERVED:
                continue
            service_files[full] = fd.name
            names = {m.name for m in s.method}
            missing = set(SERVED[full]) - names
            if missing:
                sys.exit(f"{full} has no methods {sorted(missing)} in the SDK")
            for m in s.method:
                if m.name in SERVED[full]:
                    roots += [m.input_type.lstrip("."), m.output_type.lstrip(".")]
    if set(SERVED) - set(service_files):
        sys.exit(f"services not in the SDK: {sorted(set(SERVED) - set(service_files))}")
    keep = closure(index, roots + EXTRA_TYPES)
    by_file = collections.defaultdict(set)
    for fname, top in keep:
        by_file[fname].add(top)
    for fname in service_files.values():
        by_file.setdefault(fname, set())
    written = 0
    for fname, tops in sorted(by_file.items()):
        if fname.startswith("google/protobuf/"):
            continue  # well-known types come with every protobuf toolchain
        text = render_file(files[fname], tops, SERVED, index)
        path = os.path.join(out_dir, fname)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
        written += 1
    n_methods = sum(len(v) for v in SERVED.values())
    print(f"{written} files, {len(keep)} top-level types, {len(SERVED)} services, {n_methods} methods")


if __name__ == "__main__":
    main()
