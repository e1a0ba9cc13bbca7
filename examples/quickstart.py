"""A complete (toy) off-policy RL loop with the fused VESPO loss, in plain torch. Reads top to bottom.

Policy: a bigram language model (embedding of the previous token -> logits over a small vocabulary).
Task: produce L tokens whose sum is divisible by 3 (reward 1, else 0): a random policy scores about
1/3, so there is signal from the first step. Each step samples groups of responses with the
current policy, computes GRPO group advantages, then takes N mini-batch optimizer steps over them,
so the k-th mini-batch is k policy versions stale: exactly the regime VESPO is built for.

    python examples/quickstart.py                 # ~40 steps, well under a minute on 2 cores
    python examples/quickstart.py --loss grpo     # compare with another loss on the same kernels
"""
import argparse
import time

import torch

import vespo_ext

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--steps", type=int, default=40)
p.add_argument("--vocab", type=int, default=32)
p.add_argument("--length", type=int, default=8, help="response length L")
p.add_argument("--prompts", type=int, default=16, help="prompts (groups) per rollout step")
p.add_argument("--n", type=int, default=8, help="responses per prompt")
p.add_argument("--staleness", type=int, default=4, help="N: mini-batches (optimizer steps) per rollout step")
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--loss", default="vespo", choices=vespo_ext.LOSSES)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
torch.manual_seed(args.seed)
V, L = args.vocab, args.length


class Bigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, 64)
        self.head = torch.nn.Linear(64, V)

    def forward(self, prev):  # (B, L) previous tokens -> (B, L, V) logits
        return self.head(torch.tanh(self.emb(prev)))


policy = Bigram()
opt = torch.optim.Adam(policy.parameters(), lr=args.lr)


@torch.no_grad()
def rollout(prompts):
    """Sample one response per prompt token; return tokens, previous tokens, behaviour log-probs."""
    prev = prompts.clone()
    toks, prevs, logps = [], [], []
    for _ in range(L):
        logits = policy(prev.unsqueeze(1)).squeeze(1)
        tok = torch.distributions.Categorical(logits=logits).sample()
        prevs.append(prev)
        toks.append(tok)
        prev = tok
    tokens, prev_tokens = torch.stack(toks, 1), torch.stack(prevs, 1)
    old_logp = vespo_ext.token_logprobs(policy(prev_tokens), tokens)  # fused, no grad, one read
    return tokens, prev_tokens, old_logp


print(f"loss={args.loss}  V={V}  L={L}  {args.prompts}x{args.n} responses/step  staleness N={args.staleness}")
t0 = time.time()
for step in range(args.steps):
    prompts = torch.randint(0, V, (args.prompts,)).repeat_interleave(args.n)
    tokens, prev_tokens, old_logp = rollout(prompts)
    reward = ((tokens.sum(1) + prompts) % 3 == 0).float()
    grouped = reward.view(args.prompts, args.n)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1)

    perm = torch.randperm(tokens.shape[0]).chunk(args.staleness)
    for k, idx in enumerate(perm):  # mini-batch k trains on data k policy versions old
        logits = policy(prev_tokens[idx])
        loss, m = vespo_ext.policy_loss(logits, tokens[idx], old_logp[idx], adv[idx], loss=args.loss,
                                        return_metrics=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"step {step:3d}  reward {reward.mean():.3f}  loss {loss.item():+.4f}  "
          f"phi_mean {m['phi_mean'].item():.3f}  w_seq_max {m['w_seq_max'].item():.2f}  "
          f"approx_kl {m['approx_kl'].item():+.4f}")
print(f"done in {time.time() - t0:.1f}s")
