"""A second implementation of the proto3 JSON mapping, for tests/json_golden.rs.

Reads a FileDescriptorSet and a list of cases ({"name", "type", "bytes" in
base64}); prints {name: JSON} as Google's Python protobuf library writes
each message with `always_print_fields_with_no_presence=True` (fields
without presence at their defaults, as grpc-gateway's EmitUnpopulated).
"""

import base64
import json
import sys

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory


def main() -> None:
    with open(sys.argv[1], "rb") as f:
        files = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    with open(sys.argv[2]) as f:
        cases = json.load(f)
    out = {}
    for case in cases:
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(case["type"]))
        message = cls.FromString(base64.b64decode(case["bytes"]))
        out[case["name"]] = json.loads(json_format.MessageToJson(message, always_print_fields_with_no_presence=True))
    json.dump(out, sys.stdout, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
