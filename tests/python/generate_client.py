"""A Python grpcio client of the public API, built from proto/ at run time.

Usage: generate_client.py PROTO_ROOT HOST:PORT PROMPT
Prints one JSON object: the health status, the model info and a greedy completion.
"""

import json
import os
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc


def main() -> None:
    proto_root, address, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
    out = tempfile.mkdtemp()
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(
        [
            "protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "rrt/v1/generation.proto",
        ]
    )
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")
    sys.path.insert(0, out)
    from rrt.v1 import generation_pb2, generation_pb2_grpc  # noqa: E402

    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="rrt.v1.Generation"), timeout=10
        )
        stub = generation_pb2_grpc.GenerationStub(channel)
        info = stub.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=10)
        reply = stub.Generate(
            generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=8), timeout=60
        )
        try:
            stub.Generate(generation_pb2.GenerateRequest(prompt="", max_new_tokens=8), timeout=10)
            bad = "OK"
        except grpc.RpcError as e:
            bad = e.code().name
    print(
        json.dumps(
            {
                "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
                "model": info.model,
                "loops": info.loops,
                "text": reply.text,
                "token_ids": list(reply.token_ids),
                "exit_loops": list(reply.exit_loops),
                "finish_reason": generation_pb2.FinishReason.Name(reply.finish_reason),
                "worker": reply.worker,
                "empty_prompt": bad,
            }
        )
    )


if __name__ == "__main__":
    main()
