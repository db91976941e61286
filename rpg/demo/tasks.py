r"""The demo's tasks and its policy: digit strings with a verifiable reward, and a tiny autoregressive MLP.

Both tasks write ``length`` digits y_1..y_L and are scored against a target
string: the reward is the fraction of positions holding the right digit, in
[0, 1] (0.1 in expectation for a uniform policy).

* ``counting`` — given a digit d, count up from it: y_t = (d + t − 1) mod 10.
  The policy sees d at every position, so each position is a lookup.
* ``running-sum`` — given digits x_1..x_L, write their running sums mod 10:
  y_t = (x_1 + … + x_t) mod 10. The policy sees only x_t and the digit it wrote
  last, so the only way to be right at position t is to have been right at
  t − 1 and then add x_t: L chained steps, each a 100-entry addition table,
  and one slip spoils the rest of the string.

The policy π(y_t | c_t, t, y_{t−1}) sums embeddings of the context digit c_t
(d, or x_t), the position and the previous output digit, and maps them through
a ReLU MLP to 10 logits. Its last layer starts at zero, so every run starts
from the uniform policy — the reference of the off-policy experiments, for
which the KL-regularised optimum is then known in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rpg

DIGITS = 10
START = DIGITS  # the "previous digit" index at t = 1


@dataclass(frozen=True)
class Task:
    """A digit-string task: ``contexts`` draws per-position inputs ``[N, L]``, ``targets`` gives the answer."""

    name: str
    length: int

    def contexts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, L]`` context digits c_t, the inputs the policy sees at each position."""
        if self.name == "counting":
            return torch.randint(0, DIGITS, (n, 1), generator=generator).expand(n, self.length).contiguous()
        return torch.randint(0, DIGITS, (n, self.length), generator=generator)

    def targets(self, contexts: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` the right answer for each context."""
        if self.name == "counting":
            return (contexts + torch.arange(self.length)) % DIGITS
        return contexts.cumsum(1) % DIGITS

    def reward(self, contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[N]`` fraction of positions holding the right digit."""
        return (tokens == self.targets(contexts)).float().mean(1)


TASKS = {"counting": Task("counting", 6), "running-sum": Task("running-sum", 5)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(map(repr, TASKS))}, got {name!r}")
    return TASKS[name]


class Policy(torch.nn.Module):
    """π(y_t | c_t, t, y_{t−1}): summed embeddings, a ReLU MLP, logits over 10 digits; last layer starts at 0."""

    def __init__(self, length: int, width: int = 64) -> None:
        super().__init__()
        self.length = length
        self.context = torch.nn.Embedding(DIGITS, width)
        self.position = torch.nn.Embedding(length, width)
        self.previous = torch.nn.Embedding(DIGITS + 1, width)
        self.hidden = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, DIGITS)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def _logits(self, context: torch.Tensor, position: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        h = self.context(context) + self.position(position) + self.previous(previous)
        return self.out(torch.relu(self.hidden(torch.relu(h))))

    def logits(self, contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, L, 10]`` next-digit logits at every position of ``tokens`` ``[N, L]`` (teacher forcing)."""
        previous = torch.cat([torch.full_like(tokens[:, :1], START), tokens[:, :-1]], 1)
        position = torch.arange(self.length).expand_as(tokens)
        return self._logits(contexts, position, previous)

    def token_logp(self, contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` log π of the given digits."""
        return rpg.logprobs.from_logits(self.logits(contexts, tokens), tokens)

    @torch.no_grad()
    def sample(self, contexts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``[N, L]`` digits drawn autoregressively from π."""
        n = len(contexts)
        tokens = torch.empty(n, self.length, dtype=torch.long)
        previous = torch.full((n,), START, dtype=torch.long)
        for t in range(self.length):
            logits = self._logits(contexts[:, t], torch.full((n,), t, dtype=torch.long), previous)
            previous = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
            tokens[:, t] = previous
        return tokens


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``[N]`` Σ_t KL(π(·|h_t) ‖ π_ref(·|h_t)) along each sampled string.

    Averaged over strings drawn from π it is the sequence-level KL(π ‖ π_ref)
    (chain rule), with far less variance than a sum of per-token log-ratios.
    """
    logp, ref = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    return (logp.exp() * (logp - ref)).sum((-1, -2))
