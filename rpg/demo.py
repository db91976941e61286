r"""``python -m rpg.demo``: train a tiny policy from scratch with each loss on CPU and compare them.

The task is verifiable and embedded: given a prompt digit d, emit ``LENGTH``
digits counting up from d (mod 10): ``d, d+1, d+2, …``. The reward is the
fraction of positions holding the right digit, in [0, 1] (0.1 at random). The policy is a small autoregressive MLP over
(prompt, position, previous digit) embeddings, initialised at random.

Every loss gets the same recipe (the RPG paper's setting, scaled down): groups
of ``GROUP`` samples per prompt from π_old, ``EPOCHS`` passes over
``MINIBATCHES`` mini-batches per batch with an AdamW step after each (so three
of every four updates are off-policy), and the iterative reference
update π_ref ← π_θ every ``REF_EVERY`` steps (:class:`rpg.ReferenceUpdate`) for
all losses (only those with a KL term, and REINFORCE++'s reward shaping, use
it; the KL to it is reported for every loss). Same seed, same numbers.

Prints a table (final reward, area under the reward curve, KL to the reference,
clip fraction, wall time) and writes ``<out>/demo.png`` (reward and KL curves)
when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

import rpg

DIGITS, LENGTH, GROUP, PROMPTS = 10, 6, 8, 16
EPOCHS, MINIBATCHES, REF_EVERY, LR = 2, 2, 10, 3e-3


class Policy(torch.nn.Module):
    """π(next digit | prompt, position, previous digit): embeddings summed, a ReLU MLP, logits over 10 digits."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.prompt = torch.nn.Embedding(DIGITS, width)
        self.position = torch.nn.Embedding(LENGTH, width)
        self.previous = torch.nn.Embedding(DIGITS + 1, width)  # index DIGITS = "start"
        self.mlp = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(),
                                       torch.nn.Linear(width, DIGITS))

    def logits(self, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, LENGTH, DIGITS]`` next-digit logits for every position of ``tokens`` ``[B, LENGTH]``."""
        prev = torch.cat([torch.full_like(tokens[:, :1], DIGITS), tokens[:, :-1]], 1)
        pos = torch.arange(LENGTH, device=tokens.device).expand_as(tokens)
        return self.mlp(self.prompt(prompts)[:, None] + self.position(pos) + self.previous(prev))

    def token_logp(self, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, LENGTH]`` log π of the given digits."""
        return rpg.logprobs.from_logits(self.logits(prompts, tokens), tokens)

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        tokens = torch.zeros(len(prompts), LENGTH, dtype=torch.long)
        for t in range(LENGTH):
            probs = torch.softmax(self.logits(prompts, tokens)[:, t], -1)
            tokens[:, t] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return tokens


def reward(prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Fraction of positions t holding the right digit (prompt + t) mod 10."""
    target = (prompts[:, None] + torch.arange(LENGTH)) % DIGITS
    return (tokens == target).float().mean(1)


def make_loss(name: str):
    """The loss and the advantage estimator each algorithm is run with."""
    def grpo_adv(r, mask, old, ref):
        return rpg.advantages.grpo(r, GROUP)

    def rpp_adv(r, mask, old, ref):
        return rpg.advantages.reinforce_pp(r, mask, old, ref, beta=0.01)

    table = {
        "GRPO": (rpg.GRPOLoss(beta=0.04), grpo_adv),
        "DAPO": (rpg.DAPOLoss(), grpo_adv),
        "REINFORCE++": (rpg.REINFORCEPlusPlusLoss(), rpp_adv),
        "RPG": (rpg.RPGLoss("urkl", style="differentiable", beta=0.01), grpo_adv),
        "RPG-REINFORCE": (rpg.RPGLoss("urkl", style="reinforce", beta=0.01), grpo_adv),
    }
    if name not in table:
        raise SystemExit(f"unknown loss {name!r}; choose from {', '.join(table)}")
    return table[name]


def train(name: str, steps: int, seed: int, progress=None) -> dict:
    """Train one policy from scratch; returns its curves and summary numbers."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = Policy()
    reference = copy.deepcopy(policy).requires_grad_(False)
    loss_fn, advantage_fn = make_loss(name)
    uses_ref = loss_fn.kl is not None and loss_fn.beta > 0 or name == "REINFORCE++"  # the others ignore π_ref
    schedule = rpg.ReferenceUpdate(every=REF_EVERY)
    opt = torch.optim.AdamW(policy.parameters(), lr=LR)
    rewards, kls, clips = [], [], []
    start = time.perf_counter()
    for _ in range(steps):
        prompts = torch.randint(0, DIGITS, (PROMPTS,), generator=gen).repeat_interleave(GROUP)
        tokens = policy.sample(prompts, gen)
        r = reward(prompts, tokens)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        with torch.no_grad():
            old_logp = policy.token_logp(prompts, tokens)
            ref_all = reference.token_logp(prompts, tokens)
            ref_logp = ref_all if uses_ref else None
            kls.append(rpg.k3(old_logp, ref_all).mean().item())  # tokens from π_θ: unbiased KL(π_θ‖π_ref)
        adv = advantage_fn(r, mask, old_logp, ref_all)
        step_clip = []
        for _ in range(EPOCHS):  # EPOCHS × MINIBATCHES optimizer steps per batch: all but the first off-policy
            order = torch.randperm(len(prompts), generator=gen)
            for part in order.chunk(MINIBATCHES):
                opt.zero_grad()
                out = loss_fn(policy.token_logp(prompts[part], tokens[part]), old_logp[part], adv[part], mask[part],
                              ref_logp=None if ref_logp is None else ref_logp[part])
                out.loss.backward()
                opt.step()
                step_clip.append(out.local_metrics["clip_frac"])
        rewards.append(r.mean().item())
        clips.append(sum(step_clip) / len(step_clip))
        if schedule.step():
            reference.load_state_dict(policy.state_dict())
        if progress is not None:
            progress(name, rewards[-1])
    wall = time.perf_counter() - start
    tail = rewards[-max(1, steps // 10):]
    return {"name": name, "rewards": rewards, "kls": kls, "clips": clips, "final": sum(tail) / len(tail),
            "area": sum(rewards) / len(rewards), "kl": sum(kls) / len(kls), "clip": sum(clips) / len(clips),
            "wall": wall}


def _progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # plain progress without tqdm
        count = [0]

        def tick(name, r):
            count[0] += 1
            if count[0] % 20 == 0 or count[0] == total:
                print(f"  {count[0]:4d}/{total}  {name:14s} reward {r:.3f}", file=sys.stderr, flush=True)

        return tick, (lambda: None)
    bar = tqdm(total=total, desc="training", unit="step", file=sys.stderr)

    def tick(name, r):
        bar.set_postfix_str(f"{name} reward {r:.3f}")
        bar.update(1)

    return tick, bar.close


def table(results: list[dict]) -> str:
    header = ["loss", "final reward", "reward AUC", "KL to ref (k3)", "clip frac", "wall s"]
    rows = [[r["name"], f"{r['final']:.3f}", f"{r['area']:.3f}", f"{r['kl']:.4f}", f"{r['clip']:.3f}",
             f"{r['wall']:.1f}"] for r in results]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot(results: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        ax_r.plot(r["rewards"], label=r["name"])
        ax_k.plot(r["kls"], label=r["name"])
    ax_r.set(title="reward (counting task)", xlabel="step", ylabel="mean reward")
    ax_k.set(title="KL(π_θ‖π_ref) (k3; π_ref reset every 10 steps)", xlabel="step", ylabel="KL")
    ax_r.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m rpg.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", default="GRPO,DAPO,REINFORCE++,RPG,RPG-REINFORCE",
                    help="comma-separated, from GRPO, DAPO, REINFORCE++, RPG, RPG-REINFORCE")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="demo_out", help="folder for demo.png and demo.md")
    ap.add_argument("--quick", action="store_true", help="a few steps per loss (CI)")
    args = ap.parse_args(argv)
    steps = 8 if args.quick else args.steps
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    for name in names:
        make_loss(name)  # fail fast on a bad name
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tick, close = _progress_bar(steps * len(names))
    results = [train(name, steps, args.seed, tick) for name in names]
    close()
    os.makedirs(args.out, exist_ok=True)
    text = table(results)
    print(f"\ncounting task, {steps} steps x {PROMPTS * GROUP} samples, seed {args.seed}\n")
    print(text)
    with open(os.path.join(args.out, "demo.md"), "w") as f:
        f.write(text + "\n")
    png = os.path.join(args.out, "demo.png")
    print(f"\nplot: {png}" if plot(results, png) else "\n(matplotlib not installed: no plot)")
    return results


if __name__ == "__main__":
    main()
