#!/usr/bin/env python3
"""The PyTorch reference of rrt-train's gradients (float64 autograd, written from the math, not
from the Rust code): reads a tiny recursive model and a batch written by
`cargo run --release -p rrt-train --example grad_fixture`, computes the training objective
(cross-entropy, top-k distillation with a rest bucket at a temperature, the early-exit loss with
the last loop detached, the exit adapters and classifiers) and writes the gradient of every
trainable tensor. `make train-fixtures` runs both; the outputs are committed and
crates/train/tests/pytorch.rs compares the Rust gradients with them. Needs torch, safetensors.
"""
import json
import sys

import torch
from safetensors.torch import load_file, save_file

torch.set_default_dtype(torch.float64)
d = sys.argv[1]
spec = json.load(open(f"{d}/spec.json"))
trainable = set(spec["trainable"])
P = {k: v.double().requires_grad_(k in trainable) for k, v in load_file(f"{d}/params.safetensors").items()}
cfg = spec["config"]
h, f, H, G, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
K, L = spec["block"], spec["loops"]
N = K * L
b = spec["batch"]
S, T, k = b["seqs"], b["t"], b["k"]
toks = torch.tensor(b["tokens"]).view(S, T + 1)
inp, tgt = toks[:, :T].reshape(-1), toks[:, 1:].reshape(-1)
R = S * T
w = spec["weights"]
tau = w["temperature"]

NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
OUT = [H * D, G * D, G * D, h, f, f, h]
FUSED = {"Qkv": [0, 1, 2], "O": [3], "GateUp": [4, 5], "Down": [6]}


def rms(x, g=None):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if g is None else y * g


def rope(x, heads):
    pos = torch.arange(T).repeat(S).double()
    inv = 1.0 / (theta ** (torch.arange(0, D, 2).double() / D))
    ang = pos[:, None] * inv[None, :]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x = x.view(R, heads, D)
    a, bb = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([a * c - bb * s, bb * c + a * s], -1).view(R, heads * D)


def proj(l, fused, x):
    y = x @ P[f"model.layers.{l % K}.{fused}"].T
    parts = list(torch.split(y, [OUT[p] for p in FUSED[fused]], dim=1))
    for i, p in enumerate(FUSED[fused]):
        base = f"rrt.lora.{l}.{NAMES[p]}"
        if f"{base}.lora_A.weight" in P:
            parts[i] = parts[i] + (x @ P[f"{base}.lora_A.weight"].T) @ P[f"{base}.lora_B.weight"].T
    return torch.cat(parts, 1)


def norm_weight(l, which):
    loop = f"rrt.loop_norms.{l}.{which}.weight"
    return P[loop] if loop in P else P[f"model.layers.{l % K}.{which}.weight"]


def attention(qkv):
    q, kk, v = torch.split(qkv, [H * D, G * D, G * D], dim=1)
    q, kk = rope(q, H), rope(kk, G)
    q = q.view(S, T, H, D).transpose(1, 2)
    kk = kk.view(S, T, G, D).transpose(1, 2).repeat_interleave(H // G, dim=1)
    v = v.view(S, T, G, D).transpose(1, 2).repeat_interleave(H // G, dim=1)
    scores = q @ kk.transpose(-1, -2) / D ** 0.5
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    p = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return (p @ v).transpose(1, 2).reshape(R, H * D)


def layer(l, x):
    x2 = x + proj(l, "O", attention(proj(l, "Qkv", rms(x, norm_weight(l, "input_layernorm")))))
    gu = proj(l, "GateUp", rms(x2, norm_weight(l, "post_attention_layernorm")))
    g, u = torch.split(gu, [f, f], dim=1)
    return x2 + proj(l, "Down", torch.nn.functional.silu(g) * u)


x = P["model.embed_tokens.weight"][inp]
exits = []
for l in range(N):
    x = layer(l, x)
    if (l + 1) % K == 0:
        exits.append(x)

E = P["model.embed_tokens.weight"]
logits = []
for j, xj in enumerate(exits):
    if j < L - 1 and f"rrt.exit.{j}.adapter_down.weight" in P:
        xj = xj + (xj @ P[f"rrt.exit.{j}.adapter_down.weight"].T) @ P[f"rrt.exit.{j}.adapter_up.weight"].T
    logits.append(rms(xj, P["model.norm.weight"]) @ E.T)

t_ids = torch.tensor(b["teacher_ids"]).view(R, k)
t_logits = torch.tensor(b["teacher_logits"]).double().view(R, k)
t_lse = torch.tensor(b["teacher_lse"]).double()
p_top = (t_logits / tau - t_lse[:, None]).exp()
p_rest = (1 - p_top.sum(-1)).clamp(min=0)

objective = torch.zeros(())
last = logits[-1]
p_last = last.softmax(-1).detach()
for j, z in enumerate(logits):
    weight = 1.0 if j == L - 1 else w["exit_weight"]
    ce = (z.logsumexp(-1) - z.gather(1, tgt[:, None])[:, 0]).sum()
    q = (z / tau).softmax(-1)
    q_k = q.gather(1, t_ids)
    q_rest = (q.sum(-1) - q_k.sum(-1)).clamp(min=1e-30)
    kl = (p_top * (p_top.log() - q_k.log())).sum(-1) + torch.where(p_rest > 0, p_rest * (p_rest.log() - q_rest.log()), 0.0)
    kd = tau * tau * kl.sum()
    objective = objective + weight * (w["ce"] * ce + w["kd"] * kd)
    if j < L - 1:
        qj = z.softmax(-1)
        objective = objective + w["self_kd"] * (p_last * (p_last.log() - qj.log())).sum()
        if f"rrt.exit.{j}.classifier.weight" in P:
            s = torch.sigmoid(rms(exits[j].detach()) @ P[f"rrt.exit.{j}.classifier.weight"] + P[f"rrt.exit.{j}.classifier.bias"])
            agree = (z.argmax(-1) == last.argmax(-1)).double()
            bce = -(agree * s.log() + (1 - agree) * (1 - s).log()).sum()
            objective = objective + w["classifier"] * bce

(objective / R).backward()
grads = {n: P[n].grad.float().contiguous() for n in sorted(trainable)}
save_file(grads, f"{d}/grads.safetensors")
json.dump({"objective_per_row": float(objective.detach() / R)}, open(f"{d}/expected.json", "w"))
print("objective per row", float(objective.detach() / R), "tensors", len(grads))
