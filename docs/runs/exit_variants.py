"""Exit variants trained on the cached features of exit_variants_features.py: held-out and
unseen-prompt agreement, and cov90/cov80, the largest share of target tokens that can exit (by
softmax confidence) with at least 90% / 80% of them agreeing with the deep model.

Usage: python docs/runs/exit_variants.py NAME [--layer 15] [--init N] [--nl 1] [--steps 300]
[--lr 2e-3] [--prompt 0] [--save DIR]. free train's --init-from and --prompt-positions are the
library form of --init and --prompt."""
import argparse, json, random, sys, time
import torch, torch.nn.functional as F
sys.path.insert(0, ".")
from free_cli.decoding.loading import load_engine
from free_cli.decoding.exits import ExitModule
from free_cli.decoding.adapters import Request
from free_cli.training import losses
from free_cli.training.train import TrainConfig, lr_lambda
torch.set_num_threads(2)
p = argparse.ArgumentParser()
p.add_argument("name"); p.add_argument("--layer", type=int, default=15); p.add_argument("--init", type=int, default=None)
p.add_argument("--nl", type=int, default=1); p.add_argument("--steps", type=int, default=300); p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--prompt", type=int, default=0, help="prompt positions sampled per example")
p.add_argument("--bs", type=int, default=8); p.add_argument("--evalevery", type=int, default=100)
p.add_argument("--save", default=None)
a = p.parse_args()
eng = load_engine(None, dtype="fp32", device="cpu"); ad = eng.adapter
L = a.layer
train = torch.load("exit_variants/feat_train.pt"); held = torch.load("exit_variants/feat_held.pt"); unseen = torch.load("exit_variants/feat_unseen.pt")
torch.manual_seed(0)
mod = ExitModule(ad, L, a.nl, a.init).float().requires_grad_(True)
opt = torch.optim.AdamW(mod.parameters(), lr=a.lr, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(TrainConfig(steps=a.steps, lr=a.lr), a.steps))  # free train's warm-up and cosine
rng = random.Random(0)
def positions(f, train_mode):
    # targets: positions P-1 .. n-2 predict target tokens
    pos = list(range(f["P"] - 1, f["n"] - 1))
    if train_mode and a.prompt:
        pr = list(range(0, f["P"] - 1)); rng.shuffle(pr); pos = sorted(pr[: a.prompt]) + pos
    return pos
def run(batch, train_mode):
    width = max(f["n"] for f in batch)
    h = torch.stack([F.pad(f["h"][L].float(), (0, 0, 0, width - f["n"])) for f in batch])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = ad.layer_context(h, 0, None, 0, Request([]))
        out = mod(ad, h, ctx, None)
        sel = [(b, q) for b, f in enumerate(batch) for q in positions(f, train_mode)]
        bi = torch.tensor([s[0] for s in sel]); qi = torch.tensor([s[1] for s in sel])
        logits = ad.head(out[bi, qi])
    tid = torch.cat([batch[b]["tid"][[q for bb, q in sel if bb == b]] for b in range(len(batch))]).long()
    tl = torch.cat([batch[b]["tl"][[q for bb, q in sel if bb == b]] for b in range(len(batch))]).float()
    return logits.float(), tid, tl
def evaluate(data):
    mod.eval(); agree = n = 0; confs = []; oks = []; loss = 0.0
    with torch.no_grad():
        for s in range(0, len(data), 8):
            lg, tid, tl = run(data[s:s+8], False)
            pr = lg.softmax(-1); c, am = pr.max(-1)
            ok = am == tid[:, 0]
            agree += int(ok.sum()); n += len(ok); confs.append(c); oks.append(ok)
            loss += float(losses.soft_ce(lg, tid, tl)) * len(ok)
    mod.train()
    c = torch.cat(confs); ok = torch.cat(oks).float()
    order = c.argsort(descending=True); prec = ok[order].cumsum(0) / torch.arange(1, len(ok) + 1)
    cov = lambda t: float((prec >= t).nonzero().max() + 1) / len(ok) if (prec >= t).any() else 0.0
    return {"agree": round(agree / n, 4), "loss": round(loss / n, 3), "cov90": round(cov(0.9), 3), "cov80": round(cov(0.8), 3)}
log = {"name": a.name, **vars(a)}
print(json.dumps({**log, "step": 0, "held": evaluate(held), "unseen": evaluate(unseen)}), flush=True)
t = time.time(); order = []
for step in range(1, a.steps + 1):
    if len(order) < a.bs:
        order += rng.sample(range(len(train)), len(train))
    idx, order = order[: a.bs], order[a.bs:]
    lg, tid, tl = run([train[i] for i in idx], True)
    loss = losses.soft_ce(lg, tid, tl)
    loss.backward(); torch.nn.utils.clip_grad_norm_(mod.parameters(), 1.0); opt.step(); sched.step(); opt.zero_grad()
    if step % a.evalevery == 0 or step == a.steps:
        print(json.dumps({"name": a.name, "step": step, "sec": round(time.time() - t), "loss": round(float(loss), 3), "held": evaluate(held), "unseen": evaluate(unseen)}), flush=True)
if a.save:
    mod.save(__import__("pathlib").Path(a.save), method="exit-only", base_model="default")
