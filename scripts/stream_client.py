"""Streams one generation from an rrt router and prints it as it arrives, then the exit loop of
every token. Stubs are generated from proto/ at run time (grpcio-tools).

Usage: stream_client.py PROTO_ROOT HOST:PORT PROMPT [--chat] [--max-new-tokens N]
       [--exit max-prob|margin|cosine|learned|none --threshold T]
"""

import argparse
import collections
import os
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc


def stubs(proto_root):
    out = tempfile.mkdtemp()
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(
        ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}",
         f"--grpc_python_out={out}", "rrt/v1/generation.proto"]
    )
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")
    sys.path.insert(0, out)
    from rrt.v1 import generation_pb2, generation_pb2_grpc
    return generation_pb2, generation_pb2_grpc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("proto_root")
    p.add_argument("address")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--exit", default="none")
    p.add_argument("--threshold", type=float, default=0.9)
    a = p.parse_args()
    pb, rpc = stubs(a.proto_root)
    policy = {
        "none": pb.EXIT_POLICY_NONE, "max-prob": pb.EXIT_POLICY_MAX_PROB,
        "margin": pb.EXIT_POLICY_MARGIN, "cosine": pb.EXIT_POLICY_COSINE,
        "learned": pb.EXIT_POLICY_LEARNED,
    }[a.exit]
    req = pb.GenerateRequest(
        prompt=a.prompt, chat=a.chat, max_new_tokens=a.max_new_tokens,
        exit=pb.ExitParameters(policy=policy, threshold=a.threshold),
    )
    with grpc.insecure_channel(a.address) as channel:
        stub = rpc.GenerationStub(channel)
        info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
        print(f"model {info.model}: {info.block_layers} shared layers x {info.loops} loops, "
              f"{info.workers} workers, context {info.context_length}")
        print(f"prompt: {a.prompt!r}\n---")
        exits = collections.Counter()
        started = time.time()
        first = None
        finish = 0
        for m in stub.GenerateStream(req, timeout=300):
            if first is None:
                first = time.time() - started
            sys.stdout.write(m.text)
            sys.stdout.flush()
            if m.exit_loop:
                exits[m.exit_loop] += 1
            if m.finish_reason:
                finish = m.finish_reason
        took = time.time() - started
    n = sum(exits.values())
    print("\n---")
    print(f"{n} tokens in {took:.2f} s (first after {first or 0:.2f} s), "
          f"finish {pb.FinishReason.Name(finish)}")
    hist = ", ".join(f"loop {k}: {exits[k]}" for k in sorted(exits))
    mean = sum(k * v for k, v in exits.items()) / max(n, 1)
    print(f"exit loops: {hist} (mean {mean:.2f} of {info.loops})")


if __name__ == "__main__":
    main()
