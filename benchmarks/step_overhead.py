"""Overhead of the train step over its floor (the same loss's bare value_and_grad + optax update).

    python benchmarks/step_overhead.py --config=configs/quick_digits.py
    python benchmarks/step_overhead.py --config=configs/ct_cifar10.py \\
        --config.training.distance=l2 --config.training.batch_size=8 --steps=3 --repeats=5
    python benchmarks/step_overhead.py --config=configs/quick_digits.py --profile=/tmp/prof

In one process: (a) the floor: the configured method's loss on the batch (one key, not one per
example), mean-reduced, its value_and_grad and the optax update, jitted with params and optimiser
state donated; (b) the full step (update.train_step_for, built as benchmarks/train_step.py
builds it). Their timed repetitions alternate (a b a b ...) so that machine drift falls on both;
each repetition is --steps calls, then a block; the table shows the median over --repeats.
(c) on the digits: the training loop's steps/s (train_and_evaluate, measured by its own rate
between log lines, --loop_intervals of them after the first (which holds the compile), with no
checkpoint, grid or evaluation inside), next to (b); (a) and (b) are timed again after the loop,
so that their medians bracket it (the table gives both halves' medians).
--profile=DIR also writes a jax.profiler trace of (a) and (b) to DIR and times cumulative
variants of the step (network only; + optimiser; + per-example keys; + target/EMA; full; + host
fetch) in the same alternation: the part rows are differences of medians.
"""

import dataclasses
import functools
import json
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # train_step.py beside this
import train_step as bench

from consistency.experiment import methods, networks, train, train_state, update
from consistency.io import sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_integer("steps", 10, "Calls of each step per timed repetition.")
flags.DEFINE_integer("repeats", 5, "Alternating timed repetitions of each step (median shown).")
flags.DEFINE_integer("loop_steps", 20, "Training-loop steps per log interval (0: no loop run).")
flags.DEFINE_integer("loop_intervals", 2, "Timed log intervals of the loop (median shown).")
flags.DEFINE_string("profile", "", "Directory for a jax.profiler trace and the part breakdown.")
flags.DEFINE_bool("random_lpips", False, "LPIPS with random weights (no weights files).")
flags.mark_flags_as_required(["config"])


@dataclasses.dataclass
class Runner:
    """One timed variant: call() runs one step (its state kept inside) and returns its outputs."""

    name: str
    how: str
    call: Callable
    steps_per_call: int = 1
    ms: list = dataclasses.field(default_factory=list)  # ms/step of each repetition

    @property
    def median(self) -> float:
        return statistics.median(self.ms)


def _donating(fn, args, donate):
    """A Runner call of jit(fn, donate_argnums=donate) that feeds its outputs back as the donated
    arguments (fn returns (new donated args..., value))."""
    jitted = jax.jit(fn, donate_argnums=donate)
    args = list(args)

    def call():
        out = jitted(*args)
        for i, a in zip(donate, out[:-1], strict=True):
            args[i] = a
        return out[-1]

    return call


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _full_step(s: bench.Setup, fetch: bool = False):
    """A Runner call of the compiled full step on its own copy of the state."""
    box = [_copy(s.state)]

    def call():
        box[0], metrics = s.step(box[0], s.batch, s.teacher, s.distance, s.key)
        return jax.device_get(metrics) if fetch else metrics

    return call


def variants(config, s: bench.Setup, profile: bool) -> list[Runner]:
    """The floor and the full step; with profile, the cumulative variants between them."""
    method, fns = methods.from_config(config), networks.model_fns(s.network, config)
    spec, tx, state = update.step_spec(config), s.tx, s.state
    # Everything the loss reads enters as an argument (closed over, it would be a constant).
    fixed = (state.target_params, s.teacher, s.distance, jax.tree.map(lambda v: v[0], s.batch))
    fixed = (*fixed, s.key, jnp.asarray(state.step))
    fresh = lambda: [_copy(state.params), _copy(state.opt_state), *fixed]

    def batch_loss(params, target, teacher, distance, batch, key, step):
        return method.loss(fns, distance, params, target, teacher, batch, key, step)[0].mean()

    def optimise(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def floor(params, opt_state, *args):
        value, grads = jax.value_and_grad(batch_loss)(params, *args)
        return *optimise(params, opt_state, grads), value

    n = config.training.n_jitted_steps
    runners = [
        Runner(
            "floor",
            "jit(value_and_grad(batch-mean loss) + optax update), params/opt donated",
            _donating(floor, fresh(), (0, 1)),
        ),
        Runner("full step", "update.train_step_for, state donated", _full_step(s), n),
    ]
    if not profile:
        return runners

    def grad_fn(params, target, teacher, distance, batch, key, step):
        loss = functools.partial(method.loss, fns, distance)
        fn = update.make_grad_fn(loss, spec.micro_batches, scan=update.scan_loops())
        return fn(params, target, teacher, batch, key, step)

    def per_example(params, opt_state, target, teacher, distance, batch, key, step):
        key = jax.random.fold_in(key, step)
        value, grads, _, _ = grad_fn(params, target, teacher, distance, batch, key, step)
        return *optimise(params, opt_state, grads), value

    def with_ema(st, teacher, distance, batch, key):
        key = jax.random.fold_in(key, st.step)
        value, grads, _, _ = grad_fn(
            st.params, st.target_params, teacher, distance, batch, key, st.step
        )
        mu, _ = method.schedule(st.step)
        rates = spec.ema_rates
        if spec.ema_warmup:
            rates = tuple(train_state.warmup_ema_rate(r, st.step) for r in rates)
        return train_state.apply_gradients(st, grads, tx, target_ema=mu, ema_rates=rates), value

    params, net = _copy(state.params), jax.jit(jax.value_and_grad(batch_loss))
    return [
        Runner(
            "network",
            "jit(value_and_grad(batch-mean loss)), no update",
            lambda: net(params, *fixed),
        ),
        runners[0],
        Runner(
            "per-example keys",
            "floor with update.make_grad_fn (keys fold_in(key, i), one batched loss)",
            _donating(per_example, fresh(), (0, 1)),
        ),
        Runner(
            "target + EMA",
            "per-example keys + train_state.apply_gradients (target, EMA copies), state donated",
            _donating(with_ema, [_copy(state), *fixed[1:5]], (0,)),
        ),
        runners[1],
        Runner(
            "full + host fetch",
            "full step, then jax.device_get of its metrics after every call (the loop's sync)",
            _full_step(s, fetch=True),
            n,
        ),
    ]


def time_alternating(runners: list[Runner], steps: int, repeats: int) -> None:
    """Warm each runner up twice, then `repeats` rounds of `steps` calls of each in turn."""
    for r in runners:
        for _ in range(2):
            jax.block_until_ready(r.call())
    for _ in range(repeats):
        for r in runners:
            start = time.perf_counter()
            for _ in range(steps):
                out = r.call()
            jax.block_until_ready(out)
            r.ms.append(1e3 * (time.perf_counter() - start) / (steps * r.steps_per_call))


def time_data(config, mesh, steps: int) -> Runner:
    """The loop's batch work alone: next(batches), np.stack, global_array (no step running; the
    loop makes them in a background thread while its step runs)."""
    batches = train._batches(config, mesh, 0, workdir="")  # the loop's own pipeline (pixels)
    n = config.training.n_jitted_steps
    made = train._device_batches(batches, n, sharding.stacked_batch_sharding(mesh))
    runner = Runner(
        "loop data",
        "batch fetch + stack + device put, alone (the loop prefetches it)",
        made.__next__,
        n,
    )
    time_alternating([runner], steps, 3)
    return runner


def time_loop(config, interval: int, intervals: int) -> Runner:
    """train_and_evaluate's own steps/s between its log lines, `intervals` of them after the
    first (which holds the compile); checkpoint, grid and evaluation only at the end."""
    config = config.copy_and_resolve_references()
    t = config.training
    t.num_steps, t.log_every, t.snapshot_every = (1 + intervals) * interval, interval, 10**9
    config.eval.every_steps, config.sampling.grid_size = 0, 0
    rates, log = [], train._log

    def spy(writer, step, metrics, rate, num_steps, start):  # the loop's own rate, unrounded
        rates.append(rate)
        log(writer, step, metrics, rate, num_steps, start)

    train._log = spy
    try:
        with tempfile.TemporaryDirectory() as workdir:
            train.train_and_evaluate(config, workdir)
    finally:
        train._log = log
    runner = Runner("training loop", "train_and_evaluate's rate between log lines", None)
    runner.ms = [1e3 / r for r in rates[1:]]
    return runner


def table(runners: list[Runner], floor: float, parts: bool) -> str:
    head = "| measurement | ms/step | steps/s | / floor | spread (min-max ms) | how |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in runners:
        m = r.median
        lines.append(
            f"| {r.name} | {m:.3f} | {1e3 / m:.2f} | {m / floor:.3f} | "
            f"{min(r.ms):.3f}-{max(r.ms):.3f} | {r.how} |"
        )
    if parts:
        lines += ["", "| part | ms/step (difference of medians) | rows |", "|---|---|---|"]
        for prev, r in zip(runners, runners[1:], strict=False):
            if r.name in ("loop data", "training loop"):
                break
            lines.append(
                f"| {r.name} | {r.median - prev.median:+.3f} | `{r.name}` - `{prev.name}` |"
            )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, profile = FLAGS.config, bool(FLAGS.profile)
    s = bench.setup(config, random_lpips=FLAGS.random_lpips)
    runners = variants(config, s, profile)
    time_alternating(runners, FLAGS.steps, FLAGS.repeats)
    by_name = {r.name: r for r in runners}
    floor, full = by_name["floor"].median, by_name["full step"].median
    if profile:
        with jax.profiler.trace(FLAGS.profile):
            for r in (by_name["floor"], by_name["full step"]):
                for _ in range(FLAGS.steps):
                    out = r.call()
                jax.block_until_ready(out)
    loop = None
    if FLAGS.loop_steps > 0 and config.data.name == "digits":
        compiled = list(runners)
        if profile:
            runners.append(time_data(config, s.mesh, FLAGS.steps))
        loop = time_loop(config, FLAGS.loop_steps, FLAGS.loop_intervals)
        before = {r.name: r.median for r in compiled}
        time_alternating(compiled, FLAGS.steps, FLAGS.repeats)  # again after the loop: a bracket
        for r in compiled:
            after = statistics.median(r.ms[FLAGS.repeats :])
            r.how += f"; {before[r.name]:.1f} before the loop, {after:.1f} after"
        floor, full = by_name["floor"].median, by_name["full step"].median
        runners.append(loop)
    print(table(runners, floor, profile))
    t = config.training
    result = {
        "config": config.model.name,
        "loss": t.loss,
        "batch": t.batch_size,
        "backend": jax.default_backend(),
        "steps": FLAGS.steps,
        "repeats": FLAGS.repeats,
        "ms_per_step": {r.name: r.median for r in runners},
        "overhead_full_over_floor": full / floor,
    }
    print(f"\noverhead (full / floor): {full / floor:.3f}")
    if loop is not None:
        result["loop_over_compiled"] = loop.median / full
        print(f"loop / compiled step: {loop.median / full:.3f}")
    if profile:
        result["trace_dir"] = FLAGS.profile
        print(f"trace: {FLAGS.profile} (TensorBoard profile plugin or Perfetto)")
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
