"""Write the protobuf descriptors embedded in the installed chalkcompute SDK as one FileDescriptorSet.

Usage: python sdk_descriptors.py OUT.binpb   (in a venv with chalkcompute==2.13.11)

The conformance test (crates/proto/tests/conformance.rs) compares these with the descriptors compiled from
proto/, field by field, for every method the server registers.
"""
import ast
import importlib.util
import os
import sys

from google.protobuf import descriptor_pb2


def sdk_files():
    """The FileDescriptorProtos embedded in the installed SDK's generated modules, plus the well-known types they
    import, by file name. (tools/gen_protos.py renders proto/ from the same set.)"""
    spec = importlib.util.find_spec("chalkcompute")
    if spec is None:
        sys.exit("chalkcompute is not installed in this interpreter: pip install chalkcompute==2.13.11")
    gen = os.path.join(list(spec.submodule_search_locations)[0], "_gen")
    files = {}
    for root, _, names in os.walk(gen):
        for name in names:
            if not name.endswith("_pb.py"):
                continue
            tree = ast.parse(open(os.path.join(root, name)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "file_desc":
                    arg = node.args[0]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, bytes):
                        fd = descriptor_pb2.FileDescriptorProto.FromString(arg.value)
                        files[fd.name] = fd
    if not files:
        sys.exit(f"no embedded descriptors found under {gen}")
    from google.protobuf import descriptor_pb2 as d, duration_pb2, empty_pb2, field_mask_pb2, struct_pb2, timestamp_pb2

    for mod in (d, duration_pb2, empty_pb2, field_mask_pb2, struct_pb2, timestamp_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        mod.DESCRIPTOR.CopyToProto(fdp)
        files.setdefault(fdp.name, fdp)
    return files


def main():
    from importlib.metadata import version as dist_version

    version = dist_version("chalkcompute")
    files = sdk_files()
    order, seen = [], set()

    def visit(n):
        if n in seen or n not in files:
            return
        seen.add(n)
        for dep in files[n].dependency:
            visit(dep)
        order.append(files[n])

    for n in sorted(files):
        visit(n)
    with open(sys.argv[1], "wb") as fh:
        fh.write(descriptor_pb2.FileDescriptorSet(file=order).SerializeToString())
    print(f"{len(order)} files from chalkcompute {version}", file=sys.stderr)


if __name__ == "__main__":
    main()
