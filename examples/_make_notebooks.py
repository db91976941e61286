"""Writes the example notebooks from the cell sources below and executes them, storing outputs.

    python examples/_make_notebooks.py                 # regenerate every notebook in examples/
    python examples/_make_notebooks.py trl_grpo        # or only the ones named

A notebook whose outputs show an error, stderr, a warning or a path of this machine is not written.

CI executes the stored notebooks again (tests/test_notebooks.py), so they cannot rot.
"""

from __future__ import annotations

import pathlib
import re
import sys

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent

NOTEBOOKS = {
    "exact_gradients.ipynb": [
        (
            "md",
            """# Which KL does a loss's gradient follow? Exact enumeration

A one-step policy over K actions is small enough to enumerate: `rpg.testing` computes the
*expected* gradient of a loss over tokens drawn from π_old, Σ_a π_old(a)·∇ℓ(a), and the exact
gradient of J(θ) = E_{π_θ}[A] − β·D for each divergence D. We compare them on-policy and
off-policy (θ ≠ θ_old), with a reference π_ref ≠ π_old.""",
        ),
        (
            "code",
            """import torch, rpg
from rpg import testing as T
import matplotlib.pyplot as plt

beta = 0.5
p = T.random_problem(k=8, seed=0, scale=0.7)

class K3Penalty:
    \"\"\"GRPO's KL term: −w·A + β·k3(logp → ref), unweighted, or weighted by w (the RPG correction).\"\"\"
    def __init__(self, weighted): self.weighted = weighted
    def __call__(self, logp, old_logp, advantages, mask, ref_logp=None):
        w = (logp - old_logp).exp()
        kl = rpg.k3(logp, ref_logp)
        return type("Out", (), {"per_token": -w * advantages[:, None] + beta * (w * kl if self.weighted else kl)})()

def errors(loss_fn, old_logits):
    got = T.expected_gradient(loss_fn, p.logits, old_logits, p.rewards, ref_logits=p.ref_logits)
    return {d: (got + T.objective_gradient(d, p.logits, p.ref_logits, p.rewards, beta)).abs().max().item()
            for d in ("fkl", "rkl")}

losses = {"GRPO k3": K3Penalty(False), "w·k3 (RPG fix)": K3Penalty(True),
          "RPGLoss rkl (reinforce)": rpg.RPGLoss("rkl", style="reinforce", beta=beta, clip=None),
          "RPGLoss fkl (differentiable)": rpg.RPGLoss("fkl", beta=beta, clip=None)}
rows = {(name, where): errors(fn, old) for name, fn in losses.items()
        for where, old in (("on-policy", p.logits), ("off-policy", p.old_logits))}
for (name, where), e in rows.items():
    print(f"{name:30s} {where:11s}  |Δ| vs ∇fkl {e['fkl']:.1e}   vs ∇rkl {e['rkl']:.1e}")""",
        ),
        (
            "md",
            """GRPO's unweighted k3 penalty matches the **forward** KL gradient on-policy (≈1e-17) and
neither direction off-policy; weighting it by the differentiable w turns it into the URKL
surrogate, which follows the **reverse** KL off-policy too. The RPG losses follow their own
divergence in both regimes.""",
        ),
        (
            "code",
            """labels = [f"{name} · {where}" for name, where in rows]
floor = 1e-18                                      # exact zeros drawn at the floor of the log axis
y = range(len(rows))
fig, ax = plt.subplots(figsize=(8, 4.5))
ax.barh([i - 0.2 for i in y], [max(e["fkl"], floor) for e in rows.values()], 0.4, label="vs ∇ forward KL")
ax.barh([i + 0.2 for i in y], [max(e["rkl"], floor) for e in rows.values()], 0.4, label="vs ∇ reverse KL")
ax.axvline(1e-10, color="k", ls="--", lw=1, label="tolerance of the tests (1e-10)")
ax.set_xscale("log"); ax.set_xlim(floor, 10); ax.set_yticks(list(y)); ax.set_yticklabels(labels); ax.invert_yaxis()
ax.set_xlabel("max |expected gradient − exact gradient|  (float64; left of the line = exact)")
ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
plt.tight_layout(); plt.show()""",
        ),
    ],
    "estimators.ipynb": [
        (
            "md",
            """# k1, k2, k3: bias and variance as estimators, and their gradients as losses

For x ~ q and r = p(x)/q(x): k1 = −log r, k2 = ½(log r)², k3 = (r − 1) − log r all estimate
KL(q‖p). k1 and k3 are unbiased, k3 has lower variance, k2 is biased. As *losses* their
gradients are a different story (see `exact_gradients.ipynb`).""",
        ),
        (
            "code",
            """import torch, rpg
import matplotlib.pyplot as plt

torch.manual_seed(0)
K, n = 20, 20_000
base = torch.randn(K)
results = []
for shift in [0.1, 0.3, 0.6, 1.0, 1.5]:
    log_q = torch.log_softmax(base, -1)
    log_p = torch.log_softmax(base + shift * torch.randn(K), -1)
    true = rpg.kl.kl(log_q, log_p).item()
    x = torch.multinomial(log_q.exp(), n, replacement=True)
    row = {"true": true}
    for name, est in (("k1", rpg.k1), ("k2", rpg.k2), ("k3", rpg.k3)):
        v = est(log_q[x], log_p[x])
        row[name] = (v.mean().item(), v.std().item())
    results.append(row)
    print(f"KL={true:.3f}  " + "  ".join(f"{k}: mean {row[k][0]:.3f} sd {row[k][1]:.3f}" for k in ("k1", "k2", "k3")))""",
        ),
        (
            "code",
            """fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
true = [r["true"] for r in results]
for k in ("k1", "k2", "k3"):
    a.plot(true, [r[k][0] - r["true"] for r in results], "o-", label=k)
    b.plot(true, [r[k][1] for r in results], "o-", label=k)
a.set(xlabel="true KL", ylabel="bias (mean − true)", title="bias"); b.set(xlabel="true KL", ylabel="std of one sample", title="spread")
a.legend(); plt.tight_layout(); plt.show()""",
        ),
    ],
    "custom_training_loop.ipynb": [
        (
            "md",
            """# A training loop with rpg losses, step by step

A verifiable toy task: given a digit d, emit six digits counting up from d (mod 10); reward = the
fraction of digits right (0.1 at random). The policy is a small autoregressive MLP trained from
scratch. Each step samples groups from π_old, computes group advantages, runs two epochs of
micro-batches over the batch (the second off-policy), and resets π_ref ← π_θ every 10 steps.""",
        ),
        (
            "code",
            """import copy, torch, rpg
import matplotlib.pyplot as plt

DIGITS, LENGTH, GROUP, PROMPTS = 10, 6, 8, 16

class Policy(torch.nn.Module):
    \"\"\"π(next digit | prompt, position, previous digit): summed embeddings and a small MLP.\"\"\"
    def __init__(self, width=64):
        super().__init__()
        self.prompt, self.position = torch.nn.Embedding(DIGITS, width), torch.nn.Embedding(LENGTH, width)
        self.previous = torch.nn.Embedding(DIGITS + 1, width)                 # index DIGITS = "start"
        self.mlp = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(),
                                       torch.nn.Linear(width, DIGITS))

    def logits(self, prompts, tokens):                                          # [B, LENGTH, DIGITS]
        previous = torch.cat([torch.full_like(tokens[:, :1], DIGITS), tokens[:, :-1]], 1)
        position = torch.arange(LENGTH).expand_as(tokens)
        return self.mlp(self.prompt(prompts)[:, None] + self.position(position) + self.previous(previous))

    def token_logp(self, prompts, tokens):                                      # [B, LENGTH]
        return rpg.logprobs.from_logits(self.logits(prompts, tokens), tokens)

    @torch.no_grad()
    def sample(self, prompts, generator):
        tokens = torch.zeros(len(prompts), LENGTH, dtype=torch.long)
        for t in range(LENGTH):
            probs = self.logits(prompts, tokens)[:, t].softmax(-1)
            tokens[:, t] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return tokens

def reward(prompts, tokens):
    return (tokens == (prompts[:, None] + torch.arange(LENGTH)) % DIGITS).float().mean(1)""",
        ),
        (
            "code",
            """torch.manual_seed(0); gen = torch.Generator().manual_seed(0)
policy = Policy(); reference = copy.deepcopy(policy).requires_grad_(False)
loss_fn = rpg.RPGLoss("urkl", style="reinforce", beta=0.01)        # RPG-REINFORCE with RPG-Style Clip
schedule = rpg.ReferenceUpdate(every=10)
opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
history = []
for step in range(60):
    prompts = torch.randint(0, DIGITS, (PROMPTS,), generator=gen).repeat_interleave(GROUP)
    tokens = policy.sample(prompts, gen)                               # 1. sample groups from π_old
    r = reward(prompts, tokens)
    adv = rpg.advantages.grpo(r, GROUP)                                # 2. group-relative advantages
    with torch.no_grad():
        old_logp = policy.token_logp(prompts, tokens)
        ref_logp = reference.token_logp(prompts, tokens)
    for epoch in range(2):                                             # 3. two epochs: the second is off-policy
        opt.zero_grad()
        for part in torch.randperm(len(prompts), generator=gen).chunk(2):
            out = loss_fn(policy.token_logp(prompts[part], tokens[part]), old_logp[part], adv[part], None,
                          ref_logp=ref_logp[part], batch_num_tokens=tokens.numel(), global_batch_size=len(prompts))
            out.loss.backward()                                        # micro-batches sum to the batch loss
        opt.step()
    if schedule.step():                                                # 4. iterative reference update
        reference.load_state_dict(policy.state_dict())
    # metrics of the last micro-batch of the off-policy epoch: the clip fraction is read where clipping can act
    history.append((r.mean().item(), out.metrics["clip_frac"], out.metrics["kl/ref_k3"]))
    if step % 10 == 0 or step == 59:
        print(f"step {step:3d}  reward {history[-1][0]:.3f}  clip {history[-1][1]:.3f}  KL(π_θ‖π_ref) {history[-1][2]:.4f}")""",
        ),
        (
            "code",
            """plt.figure(figsize=(5, 3)); plt.plot([h[0] for h in history])
plt.xlabel("step"); plt.ylabel("mean reward of the batch"); plt.tight_layout(); plt.show()""",
        ),
    ],
    "advantage_normalisation.ipynb": [
        (
            "md",
            """# What objective does advantage normalisation optimise?

With 0/1 rewards and success probability p for a prompt, GRPO's std-scaled advantage
(r − p)/√(p(1−p)) makes the expected update ∇p/√(p(1−p)) = 2·∇ arcsin(√p): GRPO maximises
E[h(p)] with h(p) = arcsin(√p) (up to a factor 2; Davis & Recht), which up-weights prompts that
are nearly always or nearly never solved. Dr. GRPO (no std) and RLOO follow ∇E[p]: h(p) = p.
We check it numerically with `rpg.advantages` on a large group.""",
        ),
        (
            "code",
            """import math, torch, rpg
import matplotlib.pyplot as plt

torch.manual_seed(0)
G = 4096
ps = [0.05, 0.2, 0.5, 0.8, 0.95]
for p in ps:
    r = (torch.rand(G) < p).float()
    # E[A · d log π/dp] for a Bernoulli policy: d log π(r)/dp = (r − p)/(p(1 − p))
    score = (r - p) / (p * (1 - p))
    for name, adv in (("grpo", rpg.advantages.grpo(r, G)), ("dr grpo", rpg.advantages.grpo(r, G, scale="none")),
                      ("rloo", rpg.advantages.rloo(r, G))):
        slope = (adv * score).mean().item()
        want = 1 / math.sqrt(p * (1 - p)) if name == "grpo" else 1.0
        print(f"p={p:.2f} {name:8s} E[A·score] = {slope:.3f}   h'(p) predicted {want:.3f}")""",
        ),
        (
            "code",
            """x = torch.linspace(0.001, 0.999, 200)
plt.figure(figsize=(5, 3.5))
plt.plot(x, 2 * torch.asin(x.sqrt()), label="GRPO: 2·arcsin(√p)")
plt.plot(x, math.pi * x, label="Dr. GRPO / RLOO: π·p (same range)")
plt.xlabel("success probability p"); plt.ylabel("h(p)"); plt.legend(); plt.tight_layout(); plt.show()""",
        ),
    ],
    "trl_grpo.ipynb": [
        (
            "md",
            """# rpg losses inside TRL's GRPOTrainer

`rpg.integrations.trl.RPGGRPOTrainer` is a `GRPOTrainer` that takes any rpg loss. A tiny random
Llama and a character tokenizer keep this on CPU and offline (it needs the `trl` extra). The
reward is the share of the letter 'a' in a completion: something a model this small learns in a
few dozen steps.

With `num_iterations=2` TRL trains twice on every generated batch. The first pass is
**on-policy** (π_θ = π_old: every ratio is 1 up to float32 rounding — TRL computes π_old and π_θ in
two forward passes, which round differently by about 1e-7 — so nothing can clip); the second is
**off-policy** (one optimizer step later), and that is where the clip fraction says something.""",
        ),
        (
            "code",
            """import tempfile, torch, rpg
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, PrinterCallback
from trl import GRPOConfig
from rpg.integrations.trl import RPGGRPOTrainer

vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("abcdefgh ")}}
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                     max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None))

def count_a(completions, **kwargs):
    return [c.count("a") / max(len(c), 1) for c in completions]

args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16, num_generations=8,
                  max_completion_length=8, max_steps=30, num_iterations=2, learning_rate=2e-2, logging_steps=1,
                  report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0, beta=0.0,
                  disable_tqdm=True)
trainer = RPGGRPOTrainer(loss=rpg.RPGLoss("urkl", style="reinforce", beta=1e-3), model=model,
                         reward_funcs=count_a, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"prompt": ["abc", "hgf", "bad", "fed"] * 16}))
trainer.remove_callback(PrinterCallback)          # the log is read below, from trainer.state.log_history
result = trainer.train()""",
        ),
        (
            "code",
            """log = [h for h in trainer.state.log_history if "rpg/clip_frac" in h]
on = [h for h in log if "reward" in h]            # TRL logs the reward on the step that generated the batch
off = [h for h in log if "reward" not in h]       # the second pass over that batch
print("step  pass         reward  clip_frac  ratio max")
for h in log:
    reward = f"{h['reward']:6.3f}" if "reward" in h else "     -"
    print(f"{h['step']:4d}  {'on-policy ' if 'reward' in h else 'off-policy'}  {reward}  "
          f"{h['rpg/clip_frac']:9.3f}  {h['rpg/ratio/max']:9.3f}")

first, last = (sum(h["reward"] for h in part) / len(part) for part in (on[:3], on[-3:]))
print(f"\\nreward: {first:.3f} (first 3 batches) -> {last:.3f} (last 3)")
print(f"clip fraction on the off-policy passes: mean {sum(h['rpg/clip_frac'] for h in off) / len(off):.3f}, "
      f"max {max(h['rpg/clip_frac'] for h in off):.3f}")
# on-policy: w = 1 up to float32 rounding of two forward passes (~1e-7), far inside the clip band (0.2)
assert all(h["rpg/clip_frac"] == 0 and abs(h["rpg/ratio/max"] - 1) < 1e-4 for h in on)
assert last > first + 0.2                                                       # it learns""",
        ),
        (
            "code",
            """import matplotlib.pyplot as plt
fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
a.plot([h["step"] for h in on], [h["reward"] for h in on], "o-"); a.set(xlabel="step", ylabel="mean reward",
                                                                        title="reward of each generated batch")
b.plot([h["step"] for h in off], [h["rpg/clip_frac"] for h in off], "o-", color="C1")
b.set(xlabel="step", ylabel="fraction of tokens", title="clip fraction, off-policy passes")
plt.tight_layout(); plt.show()""",
        ),
    ],
}


def build(name: str, cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src) for kind, src in cells
    ]
    return nb


DIRTY = re.compile(r"(/(home|root|tmp|work|Users|opt|usr)/|site-packages|\b[A-Z]:\\)|warn", re.I)


def problems(nb) -> list[str]:
    """What a reader should not see in stored outputs: errors, stderr, warnings, paths of this machine."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            text = (
                out.get("text", "")
                if out.get("output_type") == "stream"
                else str(out.get("data", {}).get("text/plain", ""))
            )
            if out.get("output_type") == "error" or out.get("name") == "stderr" or DIRTY.search(text):
                found.append(f"cell {i}: {out.get('output_type')} {out.get('name', '')}: {text[:200]!r}")
    return found


def execute_and_write(name: str, cells, timeout: int = 600) -> None:
    """Build ``name`` from ``cells``, execute it, and store it only if its outputs are clean."""
    nb = build(name, cells)
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", record_timing=False, resources={"metadata": {"path": str(HERE)}}
    ).execute()
    if problems(nb):
        raise SystemExit(f"{name}: not written, its outputs are not clean:\n" + "\n".join(problems(nb)))
    nbformat.write(nb, HERE / name)
    print("wrote", name)


def main(names: list[str]) -> None:
    for name, cells in NOTEBOOKS.items():
        if not names or name.removesuffix(".ipynb") in names:
            execute_and_write(name, cells)


if __name__ == "__main__":
    main(sys.argv[1:])
