"""A small transformer language model trained with jsoftmax, next to the code written today.

A decoder-only transformer (pre-norm blocks, causal multi-head attention, learned positions)
written with Flax NNX and trained with optax's AdamW on the Python standard library's own
source files, tokenized into words and punctuation with a vocabulary of the 16 384 most
frequent tokens plus an unknown token. The model is trained twice from the same parameters
on the same batches:

* ``baseline`` -- the code written today: the ``(batch, heads, T, T)`` attention scores
  ``q k^T / sqrt(d)``, an additive causal mask and ``jax.nn.softmax``, and
  ``optax.softmax_cross_entropy_with_integer_labels(h @ w, labels)`` at the output layer;
* ``jsoftmax`` -- ``jsoftmax.attention(q, k, v, is_causal=True)``, exact attention computed
  in blocks that never builds the scores, and
  ``jsoftmax.linear_cross_entropy(h, w, labels, reduction="mean")`` at the output layer, which
  never builds the tokens x vocabulary logits.

Everything else (model, initial parameters, optimizer, data order) is shared. The two runs
take their steps alternately, so both see the same load on the machine, and report: the
training and held-out losses (equal up to rounding, since the math is the same), the
compiled temporary memory of one training step and of one attention layer's forward and
backward pass, the median step time (ratio = baseline time / jsoftmax time, above 1 when
jsoftmax is faster) and a few lines of generated text.

Run::

    python examples/language_model.py                  # the full configuration (minutes)
    python examples/language_model.py --quick          # a small configuration (about a minute)
    python examples/language_model.py --context 1024   # longer sequences, same tokens per step

``--context N`` sets the sequence length (the position table and the training windows);
the batch is set so that a step keeps the configuration's number of tokens (at least one
sequence per step). The last line printed is one JSON object with the summary figures.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import pathlib
import re
import statistics
import sysconfig
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jsoftmax

# --------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the data, the model and the training run."""

    vocab_size: int = 16_384  # most frequent tokens; one more id for the unknown token
    file_percent: int = 100  # share of the standard library's files used (a fixed subset)
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 300
    warmup: int = 30
    learning_rate: float = 3e-3
    weight_decay: float = 0.1
    eval_every: int = 25
    eval_batches: int = 8
    seed: int = 0


FULL = Config()
QUICK = Config(
    file_percent=25,
    d_model=64,
    n_heads=2,
    n_layers=2,
    seq_len=64,
    batch_size=8,
    steps=40,
    warmup=5,
    learning_rate=5e-3,
    eval_every=10,
    eval_batches=4,
)


def with_context(cfg: Config, context: int) -> Config:
    """``cfg`` with sequences of ``context`` tokens and the batch that keeps the tokens per
    step of ``cfg`` (at least one sequence per step)."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}.")
    tokens = cfg.batch_size * cfg.seq_len
    return dataclasses.replace(cfg, seq_len=context, batch_size=max(1, tokens // context))


# --------------------------------------------------------------------------------------
# Data: the standard library's source files, tokenized into words and punctuation.
# --------------------------------------------------------------------------------------

TOKEN = re.compile(r"\w+|[^\w\s]|\n")
UNK = "<unk>"


@dataclasses.dataclass
class Corpus:
    """Token ids of the training and held-out files and the vocabulary (id 0 is unknown)."""

    vocab: list[str]
    train: np.ndarray
    heldout: np.ndarray
    train_files: int
    heldout_files: int
    distinct_tokens: int  # in the training files
    root: str

    @functools.cached_property
    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.vocab)}

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.index.get(t, 0) for t in TOKEN.findall(text)], np.int32)

    def decode(self, ids) -> str:
        """Tokens joined by spaces, except around newlines, before ``.,:;)]}([`` and after
        ``.([{`` (the tokenizer drops whitespace, so indentation is lost)."""
        out = ""
        for i in ids:
            t = self.vocab[int(i)]
            glue = not out or out[-1] in "\n.([{" or t == "\n" or t in ".,:;)]}(["
            out += t if glue else " " + t
        return out


def _bucket(name: str, salt: str, buckets: int) -> int:
    """A fixed pseudo-random bucket of a file name (the same on every machine)."""
    return zlib.crc32(f"{salt}:{name}".encode()) % buckets


def stdlib_files(percent: int = 100) -> tuple[pathlib.Path, list[str]]:
    """The standard library's ``.py`` files (without site-packages), sorted; ``percent`` keeps
    a fixed subset."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    names = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
    )
    return root, [n for n in names if _bucket(n, "subset", 100) < percent]


def load_corpus(cfg: Config) -> Corpus:
    """Every tenth file (by a hash of its name) is held out; the vocabulary comes from the
    training files only."""
    root, names = stdlib_files(cfg.file_percent)
    streams: dict[bool, list[list[str]]] = {False: [], True: []}
    for name in names:
        text = (root / name).read_text(encoding="utf-8", errors="replace")
        streams[_bucket(name, "heldout", 10) == 0].append(TOKEN.findall(text))
    counts = collections.Counter(t for tokens in streams[False] for t in tokens)
    vocab = [UNK] + [t for t, _ in counts.most_common(cfg.vocab_size)]
    index = {t: i for i, t in enumerate(vocab)}

    def ids(files):
        return np.array([index.get(t, 0) for tokens in files for t in tokens], np.int32)

    return Corpus(
        vocab=vocab,
        train=ids(streams[False]),
        heldout=ids(streams[True]),
        train_files=len(streams[False]),
        heldout_files=len(streams[True]),
        distinct_tokens=len(counts),
        root=str(root),
    )


def training_batches(corpus: Corpus, cfg: Config) -> np.ndarray:
    """``(steps, batch, seq_len + 1)`` windows at random offsets of the training stream."""
    rng = np.random.default_rng(cfg.seed)
    starts = rng.integers(0, len(corpus.train) - cfg.seq_len - 1, size=(cfg.steps, cfg.batch_size))
    return corpus.train[starts[..., None] + np.arange(cfg.seq_len + 1)]


def heldout_batches(corpus: Corpus, cfg: Config) -> np.ndarray:
    """``(eval_batches, batch, seq_len + 1)`` windows evenly spread over the held-out stream."""
    n = cfg.eval_batches * cfg.batch_size
    starts = np.linspace(0, len(corpus.heldout) - cfg.seq_len - 1, n).astype(np.int64)
    windows = corpus.heldout[starts[:, None] + np.arange(cfg.seq_len + 1)]
    return windows.reshape(cfg.eval_batches, cfg.batch_size, cfg.seq_len + 1)


# --------------------------------------------------------------------------------------
# The model: one definition for both runs.
# --------------------------------------------------------------------------------------


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.n_heads = cfg.n_heads
        self.qkv = nnx.Linear(cfg.d_model, 3 * cfg.d_model, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(cfg.d_model, cfg.d_model, use_bias=False, rngs=rngs)

    def __call__(self, x, attend):
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * self.n_heads, d // self.n_heads), 3, 2)
        return self.out(attend(q, k, v).reshape(b, t, d))  # q, k, v: (B, T, heads, head dim)


class Block(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.attention = CausalSelfAttention(cfg, rngs=rngs)
        self.norm2 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.up = nnx.Linear(cfg.d_model, 4 * cfg.d_model, rngs=rngs)
        self.down = nnx.Linear(4 * cfg.d_model, cfg.d_model, rngs=rngs)

    def __call__(self, x, attend):
        x = x + self.attention(self.norm1(x), attend)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TransformerLM(nnx.Module):
    """Token and learned position embeddings, pre-norm blocks, a final norm and an output
    layer ``head`` whose kernel has the Flax layout ``(d_model, vocabulary)``."""

    def __init__(self, cfg: Config, vocab: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(vocab, cfg.d_model, embedding_init=init, rngs=rngs)
        self.position = nnx.Embed(cfg.seq_len, cfg.d_model, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, vocab, use_bias=False, kernel_init=init, rngs=rngs)

    def hidden(self, tokens, attend):
        """The last hidden states ``(B, T, d_model)``, before the output layer; ``attend``
        maps each layer's ``q, k, v`` (``(B, T, heads, head dim)``) to its causal attention
        output of the same shape."""
        x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[-1]))
        for block in self.blocks:
            x = block(x, attend)
        return self.norm(x)


# --------------------------------------------------------------------------------------
# The two runs differ only here: causal attention and the loss at the output layer.
# --------------------------------------------------------------------------------------


def baseline_attention(q, k, v):
    """Today's code: the (B, heads, T, T) scores, an additive causal mask broadcast over batch
    and heads, jax.nn.softmax, then the weighted sum of the values."""
    t = q.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((1, 1, t, t), bool))  # query q sees keys k <= q
    p = jax.nn.softmax(scores + jnp.where(causal, 0.0, -1e9), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def baseline_loss(model: TransformerLM, tokens):
    """Today's code: the logits ``h @ w`` (tokens x vocabulary) and optax's cross-entropy."""
    h = model.hidden(tokens[:, :-1], baseline_attention)
    logits = h @ model.head.kernel
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def jsoftmax_attention(q, k, v):
    """jsoftmax: exact attention in blocks (online softmax), the scores never built; the
    backward pass recomputes each block; blocks above the diagonal are skipped."""
    return jsoftmax.attention(q, k, v, is_causal=True)


def jsoftmax_loss(model: TransformerLM, tokens):
    """jsoftmax: the output layer and the loss fused; the logits are never built."""
    h = model.hidden(tokens[:, :-1], jsoftmax_attention)
    w = model.head.kernel[...]  # the nnx.Param's array
    return jsoftmax.linear_cross_entropy(h, w, tokens[:, 1:], reduction="mean")


RUNS = {
    "baseline": (baseline_attention, baseline_loss),
    "jsoftmax": (jsoftmax_attention, jsoftmax_loss),
}


def attention_temp_bytes(attend, shape: tuple[int, int, int, int], dtype=jnp.float32) -> int:
    """The compiled temporary memory of one attention layer's training step: the value and
    the gradients with respect to ``q, k, v`` (each of ``shape`` = ``(B, T, heads, head
    dim)``) of ``sum(attend(q, k, v) * g)``, ``g`` the output's cotangent."""
    spec = jax.ShapeDtypeStruct(shape, dtype)

    def step(q, k, v, g):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v) * g)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    return temp_size(jax.jit(step).lower(spec, spec, spec, spec).compile())


def temp_size(compiled) -> int:
    """The temporary bytes of a compiled function (``memory_analysis``)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError("this backend reports no memory analysis of compiled code")
    return analysis.temp_size_in_bytes


# --------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay, gradients clipped to norm 1; weight decay
    on matrices only (not on biases and norm scales)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup, cfg.steps, cfg.learning_rate / 10
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b2=0.98, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def init_state(cfg: Config, vocab: int):
    """``(graphdef, state)`` of the model and its optimizer, from ``cfg.seed``."""
    model = TransformerLM(cfg, vocab, rngs=nnx.Rngs(cfg.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(cfg), wrt=nnx.Param)
    return nnx.split((model, optimizer))


def make_train_step(graphdef, loss_fn):
    """One AdamW step as a pure function of ``(state, tokens)``, for :func:`jax.jit`."""

    def train_step(state, tokens):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return train_step


def make_eval_loss(graphdef, loss_fn):
    def eval_loss(state, batches):
        model, _ = nnx.merge(graphdef, state)
        return jnp.mean(jax.lax.map(lambda tokens: loss_fn(model, tokens), batches))

    return eval_loss


@dataclasses.dataclass
class Results:
    cfg: Config
    corpus: Corpus
    parameters: int
    train_loss: dict[str, list[float]]
    eval_steps: list[int]
    heldout_loss: dict[str, list[float]]
    step_seconds: dict[str, list[float]]
    temp_bytes: dict[str, int]
    attention_temp_bytes: dict[str, int]  # one attention layer's forward and backward pass
    compile_seconds: dict[str, float]
    states: dict  # the final (model, optimizer) states
    graphdef: Any  # nnx.GraphDef of (model, optimizer)

    @property
    def initial_loss(self) -> float:
        return self.heldout_loss["baseline"][0]

    def step_time(self, name: str) -> float:
        """Median seconds per step, the first step left out."""
        return statistics.median(self.step_seconds[name][1:])

    @property
    def step_time_ratio(self) -> float:
        """Baseline time / jsoftmax time: above 1 when jsoftmax is faster."""
        return self.step_time("baseline") / self.step_time("jsoftmax")

    def max_relative_difference(self) -> float:
        """The largest ``|jsoftmax - baseline| / baseline`` over every logged loss."""
        diffs = [
            abs(j - b) / abs(b)
            for losses in (self.train_loss, self.heldout_loss)
            for b, j in zip(losses["baseline"], losses["jsoftmax"], strict=True)
        ]
        return max(diffs)

    def summary(self) -> dict:
        return {
            "initial_loss": self.initial_loss,
            "loss_baseline": self.heldout_loss["baseline"][-1],
            "loss_jsoftmax": self.heldout_loss["jsoftmax"][-1],
            "max_relative_difference": self.max_relative_difference(),
            "step_temp_bytes_baseline": self.temp_bytes["baseline"],
            "step_temp_bytes_jsoftmax": self.temp_bytes["jsoftmax"],
            "temp_bytes_ratio": self.temp_bytes["baseline"] / self.temp_bytes["jsoftmax"],
            "attention_temp_bytes_baseline": self.attention_temp_bytes["baseline"],
            "attention_temp_bytes_jsoftmax": self.attention_temp_bytes["jsoftmax"],
            "step_time_baseline_s": self.step_time("baseline"),
            "step_time_jsoftmax_s": self.step_time("jsoftmax"),
            "step_time_ratio": self.step_time_ratio,
        }


def train(cfg: Config, corpus: Corpus | None = None, log=print) -> Results:
    """Trains both runs from the same parameters on the same batches, step by step in turn."""
    corpus = load_corpus(cfg) if corpus is None else corpus
    vocab = len(corpus.vocab)
    batches = training_batches(corpus, cfg)
    held = jnp.asarray(heldout_batches(corpus, cfg))
    graphdef, state0 = init_state(cfg, vocab)
    params = nnx.state(nnx.merge(graphdef, state0)[0], nnx.Param)
    parameters = sum(p.size for p in jax.tree.leaves(params))

    steps, evals, states, temp, compile_s = {}, {}, {}, {}, {}
    attention_shape = (cfg.batch_size, cfg.seq_len, cfg.n_heads, cfg.d_model // cfg.n_heads)
    attention_temp = {n: attention_temp_bytes(a, attention_shape) for n, (a, _) in RUNS.items()}
    for name, (_, loss_fn) in RUNS.items():
        t0 = time.perf_counter()
        lowered = jax.jit(make_train_step(graphdef, loss_fn), donate_argnums=0).lower(
            state0, jnp.asarray(batches[0])
        )
        steps[name] = lowered.compile()
        temp[name] = temp_size(steps[name])
        evals[name] = jax.jit(make_eval_loss(graphdef, loss_fn)).lower(state0, held).compile()
        compile_s[name] = time.perf_counter() - t0
        states[name] = jax.tree.map(jnp.copy, state0)  # each run owns (and donates) a copy

    names = list(RUNS)
    train_loss = {n: [] for n in names}
    heldout = {n: [] for n in names}
    seconds = {n: [] for n in names}
    eval_steps = []

    def evaluate(step):
        eval_steps.append(step)
        for n in names:
            heldout[n].append(float(evals[n](states[n], held)))
        log(
            f"step {step:4d}  held-out loss  baseline {heldout['baseline'][-1]:.4f}"
            f"  jsoftmax {heldout['jsoftmax'][-1]:.4f}"
        )

    evaluate(0)
    for step in range(cfg.steps):
        tokens = jnp.asarray(batches[step])
        for n in names if step % 2 == 0 else names[::-1]:  # alternate who goes first
            t0 = time.perf_counter()
            states[n], loss = steps[n](states[n], tokens)
            loss = float(loss)  # waits for the step
            seconds[n].append(time.perf_counter() - t0)
            train_loss[n].append(loss)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evaluate(step + 1)

    return Results(
        cfg=cfg,
        corpus=corpus,
        parameters=parameters,
        train_loss=train_loss,
        eval_steps=eval_steps,
        heldout_loss=heldout,
        step_seconds=seconds,
        temp_bytes=temp,
        attention_temp_bytes=attention_temp,
        compile_seconds=compile_s,
        states=states,
        graphdef=graphdef,
    )


# --------------------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------------------


def generate(results: Results, name: str, prompt: str, n_tokens: int, seed: int = 0) -> str:
    """Samples ``n_tokens`` after ``prompt`` (temperature 0.8, unknown token excluded) from
    the final model of run ``name``, using that run's attention."""
    cfg, corpus = results.cfg, results.corpus
    attention = RUNS[name][0]
    model, _ = nnx.merge(results.graphdef, results.states[name])

    @jax.jit
    def next_logits(window, last):
        h = model.hidden(window[None], attention)[0, last]
        return (h @ model.head.kernel).at[0].set(-jnp.inf) / 0.8

    ids = list(corpus.encode(prompt))
    key = jax.random.key(seed)
    for _ in range(n_tokens):
        context = ids[-cfg.seq_len :]
        window = np.zeros(cfg.seq_len, np.int32)
        window[: len(context)] = context  # causal: the padding after `last` is never seen
        key, sub = jax.random.split(key)
        ids.append(int(jax.random.categorical(sub, next_logits(window, len(context) - 1))))
    return corpus.decode(ids)


# --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small configuration")
    parser.add_argument(
        "--context",
        type=int,
        metavar="N",
        help=f"sequence length (default: {FULL.seq_len}, or {QUICK.seq_len} with --quick); "
        "the batch is set to keep the tokens per step",
    )
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.context is not None:
        if args.context < 2:
            parser.error(f"--context must be at least 2, got {args.context}")
        cfg = with_context(cfg, args.context)
    t0 = time.perf_counter()
    corpus = load_corpus(cfg)
    print(
        f"data: {corpus.train_files} training files ({len(corpus.train):,} tokens), "
        f"{corpus.heldout_files} held-out files ({len(corpus.heldout):,} tokens) from "
        f"{corpus.root}; vocabulary {len(corpus.vocab):,} (incl. {UNK}) of "
        f"{corpus.distinct_tokens:,} distinct training tokens; "
        f"unknown: {np.mean(corpus.heldout == 0):.1%} of held-out tokens"
    )
    results = train(cfg, corpus)
    print(
        f"parameters: {results.parameters:,}; context {cfg.seq_len}, batch {cfg.batch_size}, "
        f"{cfg.steps} steps"
    )
    for name in RUNS:
        print(
            f"{name:8s}  step temporaries {results.temp_bytes[name] / 2**20:7.1f} MiB"
            f"  one attention layer {results.attention_temp_bytes[name] / 2**20:7.1f} MiB"
            f"  median step {results.step_time(name) * 1e3:7.1f} ms"
        )
    attention = results.attention_temp_bytes
    print(
        f"temporary memory ratio (baseline / jsoftmax): "
        f"{results.temp_bytes['baseline'] / results.temp_bytes['jsoftmax']:.2f} per step, "
        f"{attention['baseline'] / attention['jsoftmax']:.2f} per attention layer; "
        f"step time ratio (baseline / jsoftmax, above 1: jsoftmax faster): "
        f"{results.step_time_ratio:.2f}"
    )
    print(f"largest relative loss difference: {results.max_relative_difference():.2e}")
    print("sample (jsoftmax run):")
    print(generate(results, "jsoftmax", "def ", 30 if args.quick else 60))
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    print(json.dumps(results.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
