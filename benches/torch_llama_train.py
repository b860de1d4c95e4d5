"""PyTorch eager twin of tinygpt's `pretrain --arch llama` (GptConfig::llama_tiny by default):
RoPE (rotate-half), RMSNorm, SwiGLU, grouped-query attention, tied head, no biases, AdamW with
tinygpt's recipe, on char-level data. Prints one JSON line.

Env: L H KV C I T B (ints), THETA, THREADS, STEPS.
Usage: python3 benches/torch_llama_train.py ../shared/data/tinyshakespeare.txt
"""
import json, os, sys, time
import torch, torch.nn as nn, torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
torch.manual_seed(0)
text = open(sys.argv[1], encoding="utf-8").read()
chars = sorted(set(text)); stoi = {c: i for i, c in enumerate(chars)}
data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
g = lambda k, d: int(os.environ.get(k, d))
V = len(chars) + 5  # tinygpt adds <|endoftext|> and reserves the 4 chat tokens
L, H, KV, C, I, T, B = g("L", 4), g("H", 4), g("KV", 2), g("C", 128), g("I", 384), g("T", 64), g("B", 12)
steps, hs = g("STEPS", 50), C // g("H", 4)
theta = float(os.environ.get("THETA", "10000"))

inv_freq = 1.0 / (theta ** (torch.arange(0, hs, 2).float() / hs))
freqs = torch.outer(torch.arange(T).float(), inv_freq)
cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()  # (T, hs)

def rope(x):  # (B, n, T, hs)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin

class Block(nn.Module):
    def __init__(s):
        super().__init__()
        s.input_layernorm, s.post_attention_layernorm = nn.RMSNorm(C, eps=1e-5), nn.RMSNorm(C, eps=1e-5)
        s.q_proj, s.k_proj, s.v_proj = nn.Linear(C, H * hs, bias=False), nn.Linear(C, KV * hs, bias=False), nn.Linear(C, KV * hs, bias=False)
        s.o_proj = nn.Linear(H * hs, C, bias=False)
        s.gate_proj, s.up_proj, s.down_proj = nn.Linear(C, I, bias=False), nn.Linear(C, I, bias=False), nn.Linear(I, C, bias=False)
    def forward(s, x):
        b, t, _ = x.shape
        h = s.input_layernorm(x)
        q = rope(s.q_proj(h).view(b, t, H, hs).transpose(1, 2))
        k = rope(s.k_proj(h).view(b, t, KV, hs).transpose(1, 2))
        v = s.v_proj(h).view(b, t, KV, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + s.o_proj(y.transpose(1, 2).reshape(b, t, H * hs))
        h = s.post_attention_layernorm(x)
        return x + s.down_proj(F.silu(s.gate_proj(h)) * s.up_proj(h))

class Llama(nn.Module):
    def __init__(s):
        super().__init__()
        s.embed_tokens = nn.Embedding(V, C)
        s.layers = nn.ModuleList([Block() for _ in range(L)])
        s.norm = nn.RMSNorm(C, eps=1e-5)
    def forward(s, idx, tgt):
        x = s.embed_tokens(idx)
        for blk in s.layers: x = blk(x)
        logits = s.norm(x) @ s.embed_tokens.weight.T
        return F.cross_entropy(logits.view(-1, V), tgt.view(-1))

m = Llama()
decay = [p for p in m.parameters() if p.dim() >= 2]; nodecay = [p for p in m.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
n = int(0.9 * len(data)); train = data[:n]
def batch():
    ix = torch.randint(len(train) - T - 1, (B,))
    return torch.stack([train[i:i + T] for i in ix]), torch.stack([train[i + 1:i + T + 1] for i in ix])
def step():
    x, y = batch(); loss = m(x, y); opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); return loss.item()
for _ in range(3): step()
t0 = time.perf_counter()
for _ in range(steps): last = step()
dt = time.perf_counter() - t0
print(json.dumps({"L": L, "H": H, "KV": KV, "C": C, "I": I, "T": T, "B": B, "steps": steps,
                  "params": sum(p.numel() for p in m.parameters()),
                  "tokens_per_sec": steps * B * T / dt, "ms_per_step": dt / steps * 1e3, "loss": last}))
