"""The readable pure-torch version of every op: the test oracle, the documentation, and the
fallback on devices the kernels do not cover. Same signatures as the fused ops.

The math is docs/spec.md's (VESPO, arXiv 2602.10693). Computation happens in float32, or in float64
when the inputs are float64 (the tests' oracle). Gradients come from autograd.
"""
from __future__ import annotations

import torch

from ._inputs import check_cu_seqlens, check_ignore_index, check_logits_labels, check_temperature, pack_inputs
from ._spec import METRIC_NAMES, resolve_loss


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def token_logprobs(logits, labels, *, cu_seqlens=None, temperature=1.0, return_entropy=False, ignore_index=-100):
    """log softmax(logits / temperature) at the labels; labels == ignore_index give 0."""
    check_logits_labels(logits, labels)
    temperature = check_temperature(temperature)
    ignore_index = check_ignore_index(ignore_index)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, labels.numel(), logits.device)
    V = logits.shape[-1]
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if bool(bad.any()):
        raise IndexError(f"labels must be in [0, {V}) or {ignore_index}, got {int(labels[bad][0])}")
    x = logits.to(_compute_dtype(logits)) / temperature
    lse = torch.logsumexp(x, dim=-1)
    valid = labels != ignore_index
    logp = torch.where(valid, x.gather(-1, labels.clamp(0, V - 1).long().unsqueeze(-1)).squeeze(-1) - lse, 0.0)
    if not return_entropy:
        return logp
    p = torch.softmax(x, dim=-1)
    entropy = lse - torch.where(p > 0, p * x, 0.0).sum(-1)  # -inf logits have p = 0 and add nothing
    return logp, entropy


def _segments(cu: torch.Tensor, T: int):
    S = cu.numel() - 1
    lengths = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(S, device=cu.device), lengths, output_size=T)
    return S, lengths, seq


def _seg_sum(values: torch.Tensor, seq: torch.Tensor, S: int) -> torch.Tensor:
    return torch.zeros(S, dtype=values.dtype, device=values.device).index_add(0, seq, values)


def policy_loss_from_logp(logp, old_logp, advantages, mask=None, *, loss="vespo", cu_seqlens, rollout_is_weights=None,
                          agg=None, norm=None, norm_len: float = 0.0, return_metrics=False, **params):
    """The sequence-level part of every loss, on packed 1-D per-token tensors; differentiable in logp."""
    agg, p = resolve_loss(loss, agg, params)
    dt = logp.dtype
    T = logp.numel()
    S, lengths, seq = _segments(cu_seqlens, T)
    m = torch.ones(T, dtype=torch.bool, device=logp.device) if mask is None else mask.reshape(-1).bool()
    zero = torch.zeros((), dtype=dt, device=logp.device)
    # Uncounted positions may hold anything (NaN, garbage): they are replaced before any arithmetic.
    lp = torch.where(m, logp, zero)
    old = torch.where(m, old_logp.to(dt), zero)
    per_token_adv = advantages.numel() != S
    adv_tok = torch.where(m, advantages.to(dt), zero) if per_token_adv else advantages.to(dt)[seq]
    cnt = _seg_sum(m.to(dt), seq, S)
    nonempty = cnt > 0

    # Sequence statistics. The sign that picks VESPO's (k, lambda) is the advantage of the first
    # counted token of the sequence.
    t_idx = torch.arange(T, device=logp.device)
    first = torch.full((S,), T, dtype=torch.long, device=logp.device).scatter_reduce(
        0, seq[m], t_idx[m], reduce="amin", include_self=True)
    if per_token_adv:
        adv_seq = torch.where(nonempty, advantages.to(dt)[first.clamp(max=max(T - 1, 0))] if T > 0 else zero, zero)
    else:
        adv_seq = torch.where(nonempty, advantages.to(dt), zero)
    log_ratio = torch.where(m, torch.clamp(lp.detach() - old, -20.0, 20.0), zero)
    if rollout_is_weights is not None:
        w = torch.where(m, rollout_is_weights.to(dt), torch.ones((), dtype=dt, device=logp.device))
        log_tis = torch.where(m, torch.clamp(torch.log(torch.clamp(w, min=1e-8)), -20.0, 20.0), zero)
    else:
        w, log_tis = None, torch.zeros_like(log_ratio)
    seq_log_tis = _seg_sum(log_tis, seq, S)
    log_w = torch.clamp(_seg_sum(log_ratio, seq, S) + seq_log_tis, -20.0, 20.0)
    W = torch.exp(log_w)
    kl = _seg_sum(torch.where(m, old - lp.detach(), zero), seq, S)

    clip = clip_low = clip_high = torch.zeros(T, dtype=torch.bool, device=logp.device)
    if loss == "vespo":
        k_pos, lam_pos, k_neg, lam_neg = p
        pos = adv_seq >= 0
        k = torch.where(pos, torch.tensor(k_pos, dtype=dt), torch.tensor(k_neg, dtype=dt))
        lam = torch.clamp(torch.where(pos, torch.tensor(lam_pos, dtype=dt), torch.tensor(lam_neg, dtype=dt)), min=1e-4)
        log_phi = lam + k * torch.log(torch.clamp(W, min=1e-8)) - lam * W
        coef = torch.nan_to_num(torch.exp(log_phi), nan=0.0, posinf=0.0, neginf=0.0).detach()
        per_token = -coef[seq] * adv_tok * lp
    elif loss == "grpo":
        eps_low, eps_high, c = p
        d = lp - old
        ratio = torch.exp(torch.clamp(d, -20.0, 20.0))
        pg1 = -adv_tok * ratio
        pg2 = -adv_tok * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        clip1 = torch.maximum(pg1, pg2)
        clip = m & (pg2 > pg1)
        clip_low, clip_high = clip & (ratio < 1 - eps_low), clip & (ratio > 1 + eps_high)
        dual = torch.minimum(-adv_tok * c, clip1)
        per_token = torch.where(adv_tok < 0, dual, clip1)
        coef = torch.ones(S, dtype=dt, device=logp.device)
    elif loss == "gspo":
        eps_low, eps_high = p
        s_hat = -kl / torch.clamp(cnt, min=1.0)  # mean of (log pi - log mu) per sequence, unclamped
        log_s = torch.clamp(s_hat.detach()[seq] + lp - lp.detach(), max=10.0)
        ratio = torch.exp(log_s)
        pg1 = -adv_tok * ratio
        pg2 = -adv_tok * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        per_token = torch.maximum(pg1, pg2)
        clip = m & (pg2 > pg1)
        clip_low, clip_high = clip & (ratio < 1 - eps_low), clip & (ratio > 1 + eps_high)
        coef = torch.exp(torch.clamp(s_hat, max=10.0))
    elif loss == "sapo":
        tau_pos, tau_neg = p
        ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
        # tau by the sign of each token's own advantage (veRL's compute_policy_loss_sapo)
        tau = torch.where(adv_tok > 0, torch.tensor(tau_pos, dtype=dt), torch.tensor(tau_neg, dtype=dt))
        per_token = -4.0 * torch.sigmoid(tau * (ratio - 1.0)) / tau * adv_tok
        coef = torch.ones(S, dtype=dt, device=logp.device)
    elif loss == "cispo":
        eps_low, eps_high = p
        ratio = torch.exp(lp.detach() - old)
        clip_low, clip_high = m & (ratio < 1 - eps_low), m & (ratio > 1 + eps_high)
        clip = clip_low | clip_high
        per_token = -torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv_tok * lp
        coef = torch.ones(S, dtype=dt, device=logp.device)
    if w is not None and loss != "vespo":
        per_token = per_token * w  # TIS weights multiply the per-token loss (VESPO folds them into W)
    per_token = torch.where(m, per_token, zero)

    # Aggregation.
    seq_loss = _seg_sum(per_token, seq, S)
    n_tok, n_seq = cnt.sum(), nonempty.sum().to(dt)
    if norm is not None:
        denom = (norm if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))).to(dt).reshape(()).to(logp.device)
    elif agg == "token-mean":
        denom = torch.clamp(n_tok, min=1.0)
    elif agg == "seq-mean-token-sum-norm":
        denom = torch.tensor(norm_len if norm_len > 0 else max(float(lengths.max()) if S > 0 else 1.0, 1.0), dtype=dt)
    else:
        denom = torch.clamp(n_seq, min=1.0)
    if agg == "seq-mean-token-mean":
        seq_loss = torch.where(nonempty, seq_loss / (cnt + 1e-8), zero)
    total = seq_loss.sum() / denom
    result = torch.where(n_seq > 0, total, zero)
    if not return_metrics:
        return result
    return result, _metrics(nonempty, n_tok, n_seq, kl, W, log_w, coef, adv_seq, seq_log_tis, clip, clip_low, clip_high)


def _metrics(nonempty, n_tok, n_seq, kl, W, log_w, coef, adv_seq, seq_log_tis, clip, clip_low, clip_high):
    with torch.no_grad():
        dt = W.dtype
        ns = int(n_seq)
        ne = nonempty

        def stat(x, fn):
            return fn(x[ne]) if ns > 0 else torch.zeros((), dtype=dt)

        def mean_over(sel, x):
            k = int(sel.sum())
            return x[sel].sum() / k if k > 0 else torch.zeros((), dtype=dt)

        pos, neg = ne & (adv_seq > 0), ne & (adv_seq < 0)
        nt = torch.clamp(n_tok, min=1.0)
        out = {
            "approx_kl": kl[ne].sum() / nt,
            "w_seq_mean": stat(W, torch.mean), "w_seq_max": stat(W, torch.max), "w_seq_min": stat(W, torch.min),
            "w_seq_std": W[ne].std() if ns > 1 else torch.zeros((), dtype=dt),
            "log_w_seq_mean": stat(log_w, torch.mean), "log_w_seq_max": stat(log_w, torch.max),
            "log_w_seq_min": stat(log_w, torch.min),
            "phi_mean": stat(coef, torch.mean), "phi_max": stat(coef, torch.max), "phi_min": stat(coef, torch.min),
            "phi_pos_mean": mean_over(pos, coef), "phi_neg_mean": mean_over(neg, coef),
            "w_pos_mean": mean_over(pos, W), "w_neg_mean": mean_over(neg, W),
            "n_pos": pos.sum().to(dt), "n_neg": neg.sum().to(dt),
            "frac_w_gt_100": (ne & (W > 100)).sum().to(dt) / max(ns, 1),
            "n_seq": n_seq.to(dt), "n_tokens": n_tok.to(dt),
            "tis_log_mean": stat(seq_log_tis, torch.mean), "tis_log_max": stat(seq_log_tis, torch.max),
            "tis_log_min": stat(seq_log_tis, torch.min),
            "clip_frac": clip.sum().to(dt) / nt, "clip_frac_low": clip_low.sum().to(dt) / nt,
            "clip_frac_high": clip_high.sum().to(dt) / nt,
        }
        assert tuple(out) == METRIC_NAMES
        return {k: v.reshape(()).to(dt) for k, v in out.items()}


def policy_loss(logits, labels, old_logp, advantages, mask=None, *, loss="vespo", cu_seqlens=None,
                rollout_is_weights=None, temperature=1.0, agg=None, norm=None, return_metrics=False,
                advantages_per=None, **params):
    """Any policy loss from the logits: log-probs by autograd-able log-softmax, then the sequence math."""
    resolve_loss(loss, agg, params)
    pk = pack_inputs(logits, labels, old_logp, advantages, mask, cu_seqlens=cu_seqlens,
                     rollout_is_weights=rollout_is_weights, temperature=temperature, norm=norm,
                     advantages_per=advantages_per)
    V = pk.logits.shape[-1]
    m = pk.mask if pk.mask is not None else torch.ones(pk.labels.shape, dtype=torch.bool, device=pk.logits.device)
    bad = m & ((pk.labels < 0) | (pk.labels >= V))
    if bool(bad.any()):
        t = int(torch.nonzero(bad)[0])
        raise IndexError(f"labels[{t}] = {int(pk.labels[t])} is outside [0, {V}) at a counted position (mask it out with mask=0)")
    # Rows that do not count are zeroed so that NaN/garbage there cannot reach the loss or gradient.
    x = torch.where(m.unsqueeze(-1), pk.logits.to(_compute_dtype(pk.logits)), 0.0) / pk.temperature
    lp = x.gather(-1, torch.where(m, pk.labels, 0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return policy_loss_from_logp(lp, pk.old_logp, pk.advantages, m, loss=loss, cu_seqlens=pk.cu_seqlens,
                                 rollout_is_weights=pk.rollout_is_weights, agg=agg, norm=pk.norm, norm_len=pk.norm_len,
                                 return_metrics=return_metrics, **params)


def vespo_loss(logits, labels, old_logp, advantages, mask=None, *, cu_seqlens=None, rollout_is_weights=None,
               temperature=1.0, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0, agg="token-mean", norm=None,
               return_metrics=False, advantages_per=None):
    """Reference VESPO loss (docs/spec.md): -phi(W_i) * A * log pi, aggregated by `agg`."""
    return policy_loss(logits, labels, old_logp, advantages, mask, loss="vespo", cu_seqlens=cu_seqlens,
                       rollout_is_weights=rollout_is_weights, temperature=temperature, agg=agg, norm=norm,
                       return_metrics=return_metrics, advantages_per=advantages_per, k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg,
                       lambda_neg=lambda_neg)


# ---------------------------------------------------------------------------------------------
# Fused linear head + loss (vespo_ext.linear): the oracle builds the full logits.
def _linear_logits(hidden, weight, bias):
    dt = _compute_dtype(hidden)
    return torch.nn.functional.linear(hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt))


def linear_policy_loss(hidden, weight, labels, old_logp, advantages, mask=None, *, bias=None, loss="vespo",
                       cu_seqlens=None, rollout_is_weights=None, temperature=1.0, agg=None, norm=None,
                       return_metrics=False, chunk_tokens=None, **params):
    """policy_loss(hidden @ weight.T + bias, ...) with the logits materialised (float64 for float64 inputs)."""
    return policy_loss(_linear_logits(hidden, weight, bias), labels, old_logp, advantages, mask, loss=loss,
                       cu_seqlens=cu_seqlens, rollout_is_weights=rollout_is_weights, temperature=temperature, agg=agg,
                       norm=norm, return_metrics=return_metrics, **params)


def linear_token_logprobs(hidden, weight, labels, *, bias=None, cu_seqlens=None, temperature=1.0,
                          return_entropy=False, chunk_tokens=None, ignore_index=-100):
    """token_logprobs(hidden @ weight.T + bias, ...), differentiable (autograd through the full logits)."""
    return token_logprobs(_linear_logits(hidden, weight, bias), labels, cu_seqlens=cu_seqlens, temperature=temperature,
                          return_entropy=return_entropy, ignore_index=ignore_index)
