"""`free`: FREE's shallow-deep module with synchronized parallel decoding (Bae, Ko, Yun, EMNLP 2023).

Every token first runs the shallow model: layers [0, L_s) and the exit head. A token whose
confidence clears λ is emitted and stacked: the deep layers [L_s, L) have not run on its position.
The next token that does not exit runs the deep layers once, in parallel, over every stacked
position plus its own (`synchronize`). The deep layers so get real keys and values for the stacked
positions instead of copied ones, and their predictions at those positions are checked against the
tokens the shallow model emitted, giving the (confidence, agreed) pairs of the threshold estimator.

The prompt is stacked too: it runs through the shallow layers first and through the deep layers
with the first synchronized pass, so with λ = 0 the deep layers never run (the shallow model
alone) and with λ above every confidence the output is the full model's.

Lossless mode (beyond the paper) accepts stacked tokens only once the deep prediction at their
position agrees. At the first disagreement it keeps the deep token, discards the rest of the stack
and rewinds every layer's cache to that position. The output then equals `full` greedy output.

A generation that ends on stacked tokens (an early-exited stop token included) is closed
deliberately: lossless mode, or `sync_at_end`, runs the deep layers over the stack, verifying it
(and resuming generation after a rejection); otherwise the stack is dropped from the shallow
layers' cache so that every layer holds the same positions.

Drafts (`--draft`, drafting.py). Besides the exit's stacked tokens, a round may verify lookup
drafts: tokens proposed by matching the text's last n-gram earlier in the prompt and output, which
no layer has run on. They are fed through the shallow layers with the token before them and the
synchronized pass checks them like stacked tokens, in lossy mode too: a lookup draft is kept only
where the deep model predicts it, so it never changes the output. With `auto`, a record stops
using the exit once its kept exits fall below the share that pays for the shallow steps
(`StepCosts.exit_break_even`); a step that neither drafts nor exits is a plain step of the full
model.
"""

from __future__ import annotations

import torch

from .. import confidence
from ..costs import measured
from ..drafting import LOOKUP, propose
from ..pruning import context_subset
from ..sampling import choose, distribution, point_mass, verify
from .rows import by_width

EXIT_PROBE = 8  # `--draft auto`: shallow predictions checked before the exit's payoff is judged


def step(engine, states, cfg) -> dict[int, list[int]]:
    """One round for every request still running (one request: the one-row case). Each decides
    what it verifies this round: lookup drafts, the exit's token, or a plain step of the full
    model. Plain steps run every layer in one pass; the rest run the shallow model together
    (grouped by width), each exit decision is made, and the requests that did not exit run the
    deep layers together, each over its own stack. Returns each request's tokens that became
    final."""
    L_s, new = cfg.exit_layer, {id(s): [] for s in states}
    measure = confidence.measure(cfg.confidence, engine)
    sync, going, exits, whole = [], [], {}, []
    for s in states:
        if s.reached_stop():  # ends on stacked tokens: check them, or drop them from the cache
            if cfg.lossless or cfg.sync_at_end:
                sync.append((s, None))
            else:
                drop_stack(engine, s, cfg)
            continue
        exits[id(s)] = uses_exit(engine, s, cfg)
        draft, n = lookup_drafts(engine, s, cfg)
        if draft:
            add_drafts(engine, s, draft, n)
        elif not exits[id(s)] and not s.pending:
            whole.append(s)  # a plain step: every layer in one pass
            continue
        going.append(s)  # the exit decides, or drafts are verified, or stacked tokens wait
    if whole:
        new |= plain_steps(engine, whole, cfg)
    for group in by_width(going):
        needs = [exits[id(s)] and s.draft_from is None for s in group]
        shallow = engine.shallow(group, L_s, needs, exit=any(exits[id(s)] for s in group), collect=measure.needs_states and any(needs))
        decided = [(s, logits, shallow.states[i] if shallow.states else None) for i, (s, logits) in enumerate(zip(group, shallow.logits)) if needs[i]]
        verdicts = measure.many([(logits, s, s.candidates, kept, L_s) for s, logits, kept in decided])
        for s, hidden in zip(group, shallow.hidden):
            s.pending.append(hidden)
        for (s, logits, _), (token, conf) in zip(decided, verdicts):
            emitted = exit_early(engine, s, cfg, token, conf, logits[0, -1])
            if emitted is None:
                sync.append((s, (token, conf)))
            else:
                new[id(s)] += emitted
        sync += [(s, None) for s, wanted in zip(group, needs) if not wanted]
    synchronize(engine, sync, cfg, new)
    return new


def plain_steps(engine, states, cfg) -> dict[int, list[int]]:
    """A step of the full model for requests whose exit is unused: every layer over the token not
    yet fed (the prompt at first), one head product."""
    L, new = engine.num_layers, {}
    for group in by_width(states):
        hidden = engine.feed(group, L)
        logits = engine.logits(None, torch.cat([h[:, -1:] for h in hidden], dim=1))[0]
        for s, row in zip(group, logits):
            s.deep_len, s.deep_passes, s.head_rows = s.fed, s.deep_passes + 1, s.head_rows + engine.vocab_size
            s.append(choose(row, cfg.sampling, s.generator)[0], L)
            new[id(s)] = s.settle()
    return new


def lookup_drafts(engine, state, cfg) -> tuple[list[int], int]:
    """This round's lookup drafts, as many as pay (drafting.py), cut after a stop token: none with
    `--draft exit`, before the prompt has run, or when nothing is left to generate."""
    room = state.max_new_tokens - len(state.generated)
    if cfg.draft == "exit" or state.fed == 0 or room < 1:
        return [], 0
    costs = measured(engine, cfg.exit_layer).relative_rows()
    draft, n = propose(state.tokens, state.acceptance, costs, min(cfg.draft_tokens, room), cfg.draft_ngram)
    stop = next((i for i, t in enumerate(draft) if t in state.stop_ids), None)
    return (draft[: stop + 1] if stop is not None else draft), n


def add_drafts(engine, state, draft: list[int], n: int) -> None:
    """Appends lookup drafts, to be fed with the token before them and checked by the next
    synchronized pass (a trained exit's layers run over them too, keeping its cache whole)."""
    state.draft_from, state.draft_ngram = len(state.tokens), n
    for token in draft:
        state.append(token, engine.num_layers, draft=LOOKUP)


def uses_exit(engine, state, cfg) -> bool:
    """Whether this record still decodes with the exit: always with `--draft exit`, never with
    `lookup`; with `auto` until enough of its shallow predictions were checked and its kept exits
    fall below the share that pays for the shallow steps."""
    if cfg.draft != "auto" or state.exit_off:
        return cfg.draft == "exit"
    if state.exit_checked >= EXIT_PROBE:
        kept = (state.exit_kept + 1) / (state.exit_checked + 2)
        state.exit_off = kept < measured(engine, cfg.exit_layer).exit_break_even()
    return not state.exit_off


def exit_early(engine, state, cfg, token: int, conf: float, logits) -> list[int] | None:
    """Stacks the shallow token when its confidence clears λ (and the stack has room): returns
    the tokens that became final (none in lossless mode), or None when the deep layers must run.
    When sampling, the stacked token is drawn from the exit's distribution (`logits`, (V,) or
    over the state's pruning subset) instead of being its argmax."""
    if conf < cfg.threshold or stack_full(state, cfg):
        return None
    draft = None
    if not cfg.sampling.greedy:
        token, draft = choose(logits, cfg.sampling, state.generator, state.candidates, engine.vocab_size)
    state.append(token, cfg.exit_layer, conf, draft if cfg.lossless else None)
    return [] if cfg.lossless else state.settle()


def stacked(state) -> int:
    """Tokens emitted since the deep layers last predicted one."""
    return len(state.tokens) - max(state.deep_len + 1, state.prompt_len)


def stack_full(state, cfg) -> bool:
    return cfg.max_stack is not None and stacked(state) >= cfg.max_stack


def synchronize(engine, sync: list[tuple], cfg, new: dict[int, list[int]]) -> None:
    """Runs the deep layers over every pending position of the requests in `sync` (each with the
    current token's own shallow (token, confidence) when it did not exit, else None), grouped by
    the width of their stacks, and settles each: its stacked tokens checked against the deep
    prediction at the position before them, the deep prediction at its last position emitted.
    Lossless mode runs a stack in one row's precision and kernels (the single steps it replaces,
    bit for bit) and a prompt's rows in their own pass, as `full` runs its prefill."""
    L_s, L, shallow_of = cfg.exit_layer, engine.num_layers, {id(s): shallow for s, shallow in sync}
    prompts = [s for s, _ in sync if cfg.lossless and s.deep_len < s.prompt_len]
    rest = [s for s, _ in sync if not (cfg.lossless and s.deep_len < s.prompt_len)]
    passes = [[s] for s in prompts] + by_width(rest, lambda s: sum(h.shape[1] for h in s.pending))
    for rows in passes:
        stacks = [torch.cat(s.pending, dim=1) for s in rows]  # (1, k_r, d): positions deep_len .. fed-1 at L_s
        if rows[0] in prompts:
            outs = [deep_with_prompt(engine, rows[0], stacks[0], cfg)]
        else:
            outs = engine.run(rows, stacks, L_s, L, [s.deep_len for s in rows], narrow=cfg.lossless)
        checked = [out[:, first_checked(s) - s.deep_len :] for s, out in zip(rows, outs)]
        logits = engine.logits(None, torch.cat(checked, dim=1).to(checked[-1].dtype), narrow=cfg.lossless)[0]  # one head product
        at = 0
        for s, out in zip(rows, checked):
            s.head_rows += out.shape[1] * engine.vocab_size
            new[id(s)] += settle(engine, s, cfg, logits[at : at + out.shape[1]], shallow_of[id(s)])
            at += out.shape[1]


def deep_with_prompt(engine, state, stack, cfg) -> torch.Tensor:
    """Lossless mode's first deep pass: the prompt's rows as `full` runs them, the stacked ones as
    its single steps."""
    L_s, L, start = cfg.exit_layer, engine.num_layers, state.deep_len
    cut = max(0, min(state.prompt_len - start, stack.shape[1]))
    parts = engine.run([state], [stack[:, :cut]], L_s, L, [start]) if cut else []
    if cut < stack.shape[1]:
        parts += engine.run([state], [stack[:, cut:]], L_s, L, [start + cut], narrow=True)
    return torch.cat([p.to(parts[-1].dtype) for p in parts], dim=1)


def first_checked(state) -> int:
    """The first position a synchronized pass predicts from: those before it predict prompt tokens."""
    return max(state.deep_len, state.prompt_len - 1)


def settle(engine, state, cfg, logits, shallow: tuple[int, float] | None) -> list[int]:
    """A synchronized pass's bookkeeping, given the deep logits (k, V) at positions
    first_checked(state) onward: checks stacked tokens, records (confidence, agreed) pairs, keeps
    the deep token after the current one or, in lossless mode, after the first disagreement, and
    returns the tokens that became final."""
    first, drafts = first_checked(state), state.draft_from or len(state.tokens) + 1
    drafted = len(state.tokens) - drafts if state.draft_from is not None else 0
    deep = logits.argmax(-1).tolist()  # deep predictions, one host sync
    state.pending.clear()
    state.deep_len = state.fed
    state.deep_passes += 1
    sampling, g = cfg.sampling, state.generator
    kept, tested = 0, drafted > 0  # lookup drafts the deep model predicted; whether it judged them
    for p, predicted in enumerate(deep, start=first):
        if p + 1 == len(state.tokens):  # the current token: its successor comes from the deep model
            if shallow is not None:
                observe(state, cfg, *shallow, agreed=shallow[0] == predicted)
            if not state.reached_stop():  # (kept drafts may end generation)
                state.append(predicted if sampling.greedy else choose(logits[p - first], sampling, g)[0], engine.num_layers)
            break
        stacked, at = state.tokens[p + 1], p + 1 - state.prompt_len
        if p + 1 < drafts:  # the exit's stacked token
            observe(state, cfg, stacked, state.confidences[at], agreed=predicted == stacked)
            if not cfg.lossless:
                continue
        if sampling.greedy:
            replacement = None if predicted == stacked else predicted
        else:  # speculative sampling's acceptance test; a lookup draft is a point mass
            draft = state.drafts[at] if state.drafts[at] is not LOOKUP else point_mass(stacked, logits)
            replacement = verify(stacked, draft, distribution(logits[p - first], sampling), g)
        if replacement is not None:
            tested = tested and p + 1 >= drafts  # not when an exit's token before them was replaced
            rewind(engine, state, p, replacement)
            break
        kept += p + 1 >= drafts
    if drafted:
        count_drafts(state, drafted, kept, tested)
    if cfg.prune == "context":  # candidates from the deep distribution that gave the last token
        state.candidates = context_subset(engine.adapter.lm_head, state.tokens, state.stop_ids, logits[p - first], cfg.prune_k)
    return state.settle()


def observe(state, cfg, token: int, conf: float, agreed: bool) -> None:
    """A shallow prediction checked by the deep model: a (confidence, agreed) pair for the
    threshold's estimator, and the exit's tally of kept exits (`uses_exit`)."""
    state.pairs.append((conf, agreed))
    state.exit_checked += 1
    state.exit_kept += conf >= cfg.threshold and (agreed or not cfg.lossless)


def count_drafts(state, drafted: int, kept: int, tested: bool) -> None:
    """A verification round's lookup drafts: how many the deep model kept (the record's stats), and,
    when it judged them, the record's acceptance for the n-gram length that proposed them."""
    state.verifications += 1
    state.drafted += drafted
    state.accepted += kept
    state.empty_verifications += kept == 0
    if tested:
        state.acceptance.observe(state.draft_ngram, kept, rejected=kept < drafted)
    state.draft_from = None


def rewind(engine, state, p: int, token: int) -> None:
    """Lossless mode: the deep model disagrees at position p. Keep its token at p + 1, discard the
    later stacked tokens, and crop every layer's cache back to positions [0, p]."""
    state.rejected += max(0, (state.draft_from or len(state.tokens)) - (p + 1))  # the exit's, not lookup's
    state.truncate(p + 1)
    state.append(token, engine.num_layers)
    engine.truncate_cache(state, p + 1)
    state.fed = state.deep_len = p + 1


def drop_stack(engine, state, cfg) -> None:
    """Leaves a trailing stack unchecked: the shallow layers' cache goes back to the deep ones'."""
    state.pending.clear()
    engine.truncate_cache(state, state.deep_len, engine.slots_through(cfg.exit_layer))
    state.fed = state.deep_len
