"""Reference check: Press & Wolf's small PTB model trained by TensorFlow, next to lmembed's runs.

    pip install tensorflow-cpu          # optional; not an lmembed dependency
    python benchmarks/press_wolf_tf.py --data ../shared/data/ptb --variants tied+PR,tied+PR-bias \
        --out runs/ptb-small-tf

Why: lmembed's PyTorch trainer reproduces three of Press & Wolf's four small-model rows, but not
tied+PR (104.9 / 100.9). This script trains the same model with TensorFlow's graph-mode
semantics, as the authors' TF code (built on the r0.8 PTB tutorial) does: a 2x200 LSTM with
zero-initialised biases and forget bias 0, every other weight U(-0.1, 0.1), the loss summed over
the 20 steps and averaged over the batch, global-norm clipping at 5 over all gradients (the
penalty's included), plain SGD at lr 1 halved each epoch after the 5th, and for PR a 200x200
matrix P (optionally with a bias) before the output embedding, penalised by
``tf.nn.l2_loss(P) / (batch * 6.5)``. The variants are the same four as ``lmembed bench tying``
(``untied``, ``tied``, ``untied+PR``, ``tied+PR``), plus ``-bias`` to give P a bias.

The data are lmembed's own token ids (``lmembed.load_corpus``), so the only difference from
``lmembed bench tying`` is the framework. ``--check-step`` instead runs one
update in both frameworks from identical weights and prints the largest difference.

Valid and test perplexity are reported after every
epoch (no early stopping: the TF tutorial reports the last epoch). Writes tf_reference.json and
.md under --out after every epoch (atomically); it does not resume.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from lmembed import LmembedError, load_corpus
from lmembed.common.files import prepare_out_dir, write_json
from lmembed.common.report import markdown_table, write_text

BATCH, STEPS, HIDDEN, LAYERS, INIT, CLIP, EPOCHS, DECAY_AFTER = 20, 20, 200, 2, 0.1, 5.0, 13, 4
PAPER = {"untied": (120.7, 114.5), "tied": (117.5, 112.4), "untied+PR": (116.0, 111.7), "tied+PR": (104.9, 100.9)}


def batches(ids: np.ndarray):
    """(x, y) windows of the stream laid out as BATCH rows, as the TF tutorial's ptb_iterator."""
    n = len(ids) // BATCH
    rows = ids[: n * BATCH].reshape(BATCH, n)
    for i in range((n - 1) // STEPS):
        yield rows[:, i * STEPS:(i + 1) * STEPS], rows[:, i * STEPS + 1:(i + 1) * STEPS + 1]


def build(tf, v1, vocab: int, tie: bool, proj: bool, proj_bias: bool, training: bool) -> dict:
    """The unrolled graph for one [BATCH, STEPS] window; variables are shared through the scope."""
    x = v1.placeholder(tf.int32, [BATCH, STEPS])
    y = v1.placeholder(tf.int32, [BATCH, STEPS])
    init = [(v1.placeholder(tf.float32, [BATCH, HIDDEN]), v1.placeholder(tf.float32, [BATCH, HIDDEN]))
            for _ in range(LAYERS)]
    emb = v1.get_variable("embedding", [vocab, HIDDEN])
    inputs = tf.nn.embedding_lookup(emb, x)
    weights = [v1.get_variable(f"lstm{k}/w", [2 * HIDDEN, 4 * HIDDEN]) for k in range(LAYERS)]
    biases = [v1.get_variable(f"lstm{k}/b", [4 * HIDDEN], initializer=v1.zeros_initializer())
              for k in range(LAYERS)]
    state, outputs = list(init), []
    for t in range(STEPS):
        h_in = inputs[:, t, :]
        for k in range(LAYERS):
            c, h = state[k]
            gates = tf.matmul(tf.concat([h_in, h], 1), weights[k]) + biases[k]
            i, j, f, o = tf.split(gates, 4, axis=1)
            c = c * tf.sigmoid(f) + tf.sigmoid(i) * tf.tanh(j)
            h_in = tf.tanh(c) * tf.sigmoid(o)
            state[k] = (c, h_in)
        outputs.append(h_in)
    h = tf.reshape(tf.concat(outputs, 1), [-1, HIDDEN])
    penalty = tf.constant(0.0)
    if proj:
        p = v1.get_variable("proj", [HIDDEN, HIDDEN])
        h = tf.matmul(h, p) + (v1.get_variable("proj_b", [HIDDEN]) if proj_bias else 0.0)
        penalty = tf.nn.l2_loss(p) / (BATCH * 6.5)
    out_w = tf.transpose(emb) if tie else v1.get_variable("softmax_w", [HIDDEN, vocab])
    logits = tf.matmul(h, out_w) + v1.get_variable("softmax_b", [vocab])
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.reshape(y, [-1]), logits=logits)
    cost = tf.reduce_sum(nll) / BATCH
    graph = {"x": x, "y": y, "init": init, "final": state, "cost": cost}
    if training:
        lr = v1.Variable(0.0, trainable=False)
        params = v1.trainable_variables()
        grads, _ = tf.clip_by_global_norm(tf.gradients(cost + penalty, params), CLIP)
        graph["train"] = v1.train.GradientDescentOptimizer(lr).apply_gradients(zip(grads, params, strict=True))
        graph["lr_value"] = v1.placeholder(tf.float32, [])
        graph["set_lr"] = v1.assign(lr, graph["lr_value"])
    return graph


def run_epoch(sess, g: dict, ids: np.ndarray, train: bool) -> float:
    zeros = np.zeros((BATCH, HIDDEN), np.float32)
    state = [(zeros, zeros)] * LAYERS
    cost, n = 0.0, 0
    for x, y in batches(ids):
        feed = {g["x"]: x, g["y"]: y}
        for (pc, ph), (c, h) in zip(g["init"], state, strict=True):
            feed[pc], feed[ph] = c, h
        out = sess.run([g["cost"], g["final"]] + ([g["train"]] if train else []), feed)
        cost, n, state = cost + out[0], n + STEPS, out[1]
    return math.exp(cost / n)


def train_variant(tf, v1, corpus, variant: str, epochs: int, seed: int, log) -> list[dict]:
    name = variant.removesuffix("-bias")
    tie, proj, proj_bias = name.startswith("tied"), name.endswith("+PR"), variant.endswith("-bias")
    history: list[dict] = []
    config = v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
    with tf.Graph().as_default(), v1.Session(config=config) as sess:
        v1.set_random_seed(seed)
        init = v1.random_uniform_initializer(-INIT, INIT)
        with v1.variable_scope("model", reuse=None, initializer=init):
            g = build(tf, v1, corpus.vocab_size, tie, proj, proj_bias, training=True)
        with v1.variable_scope("model", reuse=True, initializer=init):
            ev = build(tf, v1, corpus.vocab_size, tie, proj, proj_bias, training=False)
        sess.run(v1.global_variables_initializer())
        t0 = time.perf_counter()
        for i in range(epochs):
            lr = 0.5 ** max(i - DECAY_AFTER, 0)
            sess.run(g["set_lr"], {g["lr_value"]: lr})
            row = {"variant": variant, "epoch": i + 1, "lr": lr, "train_ppl": run_epoch(sess, g, corpus.train, True),
                   "valid_ppl": run_epoch(sess, ev, corpus.valid, False),
                   "test_ppl": run_epoch(sess, ev, corpus.test, False), "seconds": time.perf_counter() - t0}
            history.append(row)
            log(row)
    return history


def lstm_to_torch(w: np.ndarray) -> np.ndarray:
    """TF's gate blocks (i, j, f, o) in torch's order (i, f, g=j, o), along the last axis."""
    i, j, f, o = np.split(w, 4, axis=-1)
    return np.concatenate([i, f, j, o], axis=-1)


def check_step(tf, v1, vocab: int, tie: bool, proj_bias: bool, seed: int) -> dict:
    """One SGD update by the TF graph and by lmembed's trainer from identical weights and data:
    the largest difference in the updated weights, next to the size of the update itself."""
    import torch

    from lmembed.config import make_config, paper_proj_reg
    from lmembed.models import build_model
    from lmembed.training import loop

    rng = np.random.default_rng(seed)
    x, y = next(batches(rng.integers(0, vocab, size=BATCH * (STEPS + 1) * 2)))
    with tf.Graph().as_default(), v1.Session() as sess:
        v1.set_random_seed(seed)
        with v1.variable_scope("model", initializer=v1.random_uniform_initializer(-INIT, INIT)):
            g = build(tf, v1, vocab, tie, True, proj_bias, training=True)
        sess.run(v1.global_variables_initializer())
        sess.run(g["set_lr"], {g["lr_value"]: 1.0})
        names = {v.name.split("/", 1)[1][:-2]: v for v in v1.trainable_variables()}
        feed = {g["x"]: x, g["y"]: y}
        for pc, ph in g["init"]:
            feed[pc] = feed[ph] = np.zeros((BATCH, HIDDEN), np.float32)
        before = {k: sess.run(v) for k, v in names.items()}
        sess.run(g["train"], feed)
        after = {k: sess.run(v) for k, v in names.items()}

    cfg = make_config("lstm", "small", tie="tied" if tie else "none", proj_reg=paper_proj_reg(BATCH, STEPS),
                      proj_bias=proj_bias)
    model = build_model(cfg, vocab)
    h = HIDDEN

    def load(w: dict) -> None:
        with torch.no_grad():
            model.embedding.weight.copy_(torch.from_numpy(w["embedding"]))
            for k in range(LAYERS):
                lw, lb = lstm_to_torch(w[f"lstm{k}/w"]), lstm_to_torch(w[f"lstm{k}/b"])
                getattr(model.rnn, f"weight_ih_l{k}").copy_(torch.from_numpy(lw[:h].T.copy()))
                getattr(model.rnn, f"weight_hh_l{k}").copy_(torch.from_numpy(lw[h:].T.copy()))
                getattr(model.rnn, f"bias_ih_l{k}").copy_(torch.from_numpy(lb))
                getattr(model.rnn, f"bias_hh_l{k}").zero_()
            model.head.proj.weight.copy_(torch.from_numpy(w["proj"].T.copy()))
            if proj_bias:
                model.head.proj.bias.copy_(torch.from_numpy(w["proj_b"]))
            if not tie:
                model.head.out.weight.copy_(torch.from_numpy(w["softmax_w"].T.copy()))
            model.head.out.bias.copy_(torch.from_numpy(w["softmax_b"]))

    def flat() -> np.ndarray:
        return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])

    load(after)
    want = flat()
    load(before)
    start = flat()
    opt = loop.make_optimizer(cfg, model, torch.device("cpu"))
    loop.set_lr(opt, cfg.lr)
    loss, _ = model(torch.from_numpy(x), None, targets=torch.from_numpy(y))
    loop.optimizer_step(model, opt, loss + cfg.proj_reg * model.penalty(), cfg.clip)
    got = flat()
    return {"tie": tie, "proj_bias": proj_bias, "max_abs_diff": float(np.abs(got - want).max()),
            "max_abs_update": float(np.abs(want - start).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/ptb", help="PTB-layout directory or bundled corpus")
    ap.add_argument("--variants", default="tied+PR,tied+PR-bias",
                    help="comma list of untied, tied, untied+PR, tied+PR, each optionally with -bias")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-step", action="store_true",
                    help="only compare one update of TF and lmembed from identical weights (seconds)")
    ap.add_argument("--out", help="report directory (training runs)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v.removesuffix("-bias") not in PAPER:
            ap.error(f"--variants: unknown variant {v!r}; expected one of {', '.join(PAPER)} (optionally -bias)")
    try:
        import tensorflow as tf
    except ImportError:
        raise SystemExit("benchmarks/press_wolf_tf.py needs TensorFlow: pip install tensorflow-cpu") from None
    v1 = tf.compat.v1
    v1.disable_eager_execution()
    if args.check_step:
        for tie in (True, False):
            for bias in (False, True):
                r = check_step(tf, v1, 10000, tie, bias, args.seed)
                print(f"tie={r['tie']!s:5} proj_bias={r['proj_bias']!s:5}  max |lmembed - TF| after one update "
                      f"{r['max_abs_diff']:.1e}  (largest weight change {r['max_abs_update']:.1e})")
        return
    if not args.out:
        ap.error("--out is required (except with --check-step)")
    try:
        corpus = load_corpus(args.data)
        out = prepare_out_dir(args.out, force=args.force)
    except LmembedError as e:
        raise SystemExit(f"press_wolf_tf.py: {e}") from None
    rows: list[dict] = []

    def save(extra: dict) -> None:
        rows.append(extra)
        final = {}
        for r in rows:
            final[r["variant"]] = r
        table = []
        for v, r in final.items():
            pv, pt = PAPER[v.removesuffix("-bias")]
            table.append({**r, "paper_valid": pv, "paper_test": pt,
                          "test_vs_paper_pct": 100 * (r["test_ppl"] / pt - 1)})
        write_json(out / "tf_reference.json", {"data": args.data, "seed": args.seed, "framework": tf.__version__,
                                                "history": rows, "last_epoch": table})
        write_text(out / "tf_reference.md", "# Press & Wolf small model, TensorFlow reference\n\n"
                   + markdown_table(table, ["variant", "epoch", "train_ppl", "valid_ppl", "test_ppl", "paper_valid",
                                            "paper_test", "test_vs_paper_pct"]) + "\n\n## Per epoch\n\n"
                   + markdown_table(rows, ["variant", "epoch", "lr", "train_ppl", "valid_ppl", "test_ppl", "seconds"])
                   + "\n")
        print(f"{extra['variant']:>14} epoch {extra['epoch']:2d}  train {extra['train_ppl']:8.2f}  valid "
              f"{extra['valid_ppl']:8.2f}  test {extra['test_ppl']:8.2f}  ({extra['seconds']:.0f} s)", flush=True)

    for v in variants:
        train_variant(tf, v1, corpus, v, args.epochs, args.seed, save)
    print((Path(out) / "tf_reference.md").read_text())


if __name__ == "__main__":
    main()
