"""The evaluators' own jobs: chunks within the memory budget (budget.py, dense.py), mode="auto"'s
deadline (deadline.py) and the XLA options (xla.py)."""

import pytest

import jgc
from jgc._src.evaluators import dense, factory
from jgc._src.report.vocab import Mode
from jgc._src.stages import plan as pl
from jgc._src.stages.split import InputError, split_checked
from jgc.examples import mlp


def _evaluator(budget, width=12):
    ex = mlp("tanh", width=width)
    sp = split_checked(ex.params)
    plan = pl.make_plan(sp, mode=Mode.FULL, x64=True, eps=None, samples=0, seed=0)
    return factory.make_evaluator(ex.loss, sp, plan.theta, plan.dtypes, tuple(ex.args),
                                   memory_budget=budget), sp


def test_chunks_fit_the_memory_budget_and_grow_with_it():
    small, sp = _evaluator(8 * 2**10)
    large, _ = _evaluator(2**30)
    m = 2 * sp.n
    per = small.bytes_per_evaluation(sp.n)
    assert small.chunk_size(m, sp.n) * per <= 8 * 2**10
    assert large.chunk_size(m, sp.n) > small.chunk_size(m, sp.n)
    tiny, _ = _evaluator(16)
    with pytest.raises(InputError, match=r"memory_budget=16: one perturbed evaluation of this "
                       r"loss needs about .* KiB .*more than the budget of 16 bytes, and every "
                       r"mode evaluates at least one at a time. Raise memory_budget to at least "
                       rf"{per} bytes"):
        tiny.chunk_size(m, sp.n)


def test_a_check_runs_in_the_budgets_chunks(monkeypatch):
    """The sizes a check actually uses, seen from inside: all within a small budget, larger
    without it, and the same numbers either way."""
    sizes = []
    original = dense.DenseEvaluator.chunk_size

    def spy(self, m, batched):
        out = original(self, m, batched)
        sizes.append((out, out * self.bytes_per_evaluation(batched), self.memory_budget))
        return out

    monkeypatch.setattr(dense.DenseEvaluator, "chunk_size", spy)
    ex = mlp("tanh")
    small = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad, memory_budget=4096)
    small_sizes, sizes[:] = list(sizes), []
    big = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad)
    assert small_sizes and all(nbytes <= budget for _, nbytes, budget in small_sizes)
    assert max(c for c, _, _ in sizes) > max(c for c, _, _ in small_sizes)
    assert small.ok and [x.numerical for x in small.leaves] == [x.numerical for x in big.leaves]


def test_auto_deadline_predicts_other_leaves_from_their_work():
    """mode="auto" times one program and scales the leaves still to come by their planned work
    (structured leaves differ by orders of magnitude); a program's first chunk (buffers,
    threads) neither decides alone nor sets the rate."""
    from jgc._src.evaluators.deadline import Deadline, TooSlow

    def deadline(seconds):
        d = Deadline(seconds=seconds, factor=1.0, n_leaves=2)
        d.expect(0, 1000, work=1.0)  # a cheap leaf, timed first
        d.expect(1, 10, work=1e4)  # a leaf whose evaluations do 10,000x the work
        d.next_program(0)
        d.observe(100, 100, 1.0)  # a slow first chunk (0.01 s each) alone does not decide
        return d

    # Steady 1e-4 s per evaluation per unit of work. Still to do: 800 x 1 + 10 x 1e4 units,
    # 10.08 s, after 1.01 s run.
    roomy = deadline(20.0)
    roomy.observe(100, 100, 0.01)
    assert roomy.unit_rate == pytest.approx(1e-4)
    tight = deadline(10.0)
    with pytest.raises(TooSlow) as e:
        tight.observe(100, 100, 0.01)
    assert e.value.predicted == pytest.approx(1.01 + 800 * 1e-4 + 10 * 1e4 * 1e-4)


def test_light_xla_options_follow_the_predicted_work():
    from jgc._src.evaluators import programs, xla

    assert xla.light(1e6) and not xla.light(1e12) and not xla.light(None)
    assert not xla.light(1e6, forced=False)
    assert xla.light(1e12, forced=True)
    # A tiny check's batch program is compiled light; the key records it.
    ex = mlp("tanh", seed=11)
    programs.CACHE.entries.clear()
    assert jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad).ok
    kinds = {key[0]: key[-1] for key in programs.CACHE.entries}
    assert kinds["losses_at"] is True and kinds["autodiff"] is True
