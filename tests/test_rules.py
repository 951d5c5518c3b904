"""The rules are declared once in Python (fastopt/rules.py) and mirrored once in C++ (Note [a rule
in C++], csrc/include/fastopt/update_math.h): the two must name the same state lists and the same
hyperparameters in the same order, since the bindings read the hyperparameters positionally."""

import pytest
import torch

import fastopt
from fastopt import rules

needs_ext = pytest.mark.skipif(fastopt._ext._C is None, reason="needs the compiled extension")


@needs_ext
def test_every_rule_is_declared_alike_in_python_and_cpp():
    declared = fastopt._ext._C.declared_rules()
    assert set(declared) == {r.name for r in rules.RULES}
    for rule in rules.RULES:
        states, hyper = declared[rule.name]
        assert states == tuple(name for _, name in rule.state), rule.name
        assert hyper == rule.hyper, rule.name


@needs_ext
@pytest.mark.parametrize("rule", rules.RULES, ids=lambda r: r.name)
def test_each_rules_op_schema_follows_its_declaration(rule):
    """The op's arguments: params, grads, the state lists, steps, params_out, lr, the
    hyperparameters, the grad transform, then how it stores: the seeds, stochastic_state and
    compensation (Note [one schema per rule])."""
    schema = rule.list_op().default._schema
    names = [a.name for a in schema.arguments]
    expected = (["params", "grads", *(name for _, name in rule.state), "steps", "params_out", "lr", *rule.hyper,
                 "inv_scale", "clip_value", "clip_coef", "found_inf", "seeds", "stochastic_state",
                 "compensation"])
    assert names == expected
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["params", *(name for _, name in rule.state), "steps", "params_out"]


@needs_ext
def test_a_plan_refuses_hyperparameters_of_another_length():
    p = [torch.zeros(4)]
    plan = fastopt._ext._C.cpu_plan("adagrad", [p, [torch.zeros(4)], [torch.zeros(4)], []], [torch.zeros(())], p)
    p[0].grad = torch.ones(4)
    assert plan.bind_grads() == (1, 0, 0)
    with pytest.raises(RuntimeError, match="adagrad takes 4 hyperparameters after lr, got 3"):
        fastopt._ext._C.cpu_step(plan, torch.tensor(0.1, dtype=torch.float64), (0.0, 0.0, 1e-10), None, None, None,
                                 None)
    assert torch.equal(p[0], torch.zeros(4))
    with pytest.raises(RuntimeError, match="no update rule named 'sgd2'"):
        fastopt._ext._C.cpu_plan("sgd2", [p, p, p, []], [torch.zeros(())], p)


@needs_ext
def test_an_op_refuses_a_state_list_its_hyperparameters_need_but_lack():
    """amsgrad reads and writes max_exp_avg_sqs: an empty list is refused before anything is written."""
    params, grads = [torch.zeros(4)], [torch.ones(4)]
    m, v, steps = [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(())]
    with pytest.raises(RuntimeError, match="need `max_exp_avg_sqs`, one tensor per param"):
        torch.ops.fastopt.adam_(params, grads, m, v, [], steps, [], torch.tensor(0.1, dtype=torch.float64),
                                0.9, 0.999, 1e-8, 0.0, True, False, False, None, None, None, None)
    assert torch.equal(params[0], torch.zeros(4)) and float(steps[0]) == 0.0


def test_each_triton_launcher_takes_its_rules_hyperparameters():
    """The Triton launchers (triton_kernels.STEPS, by rule name) take lr and the rule's
    hyperparameters by the declaration's names (Rule.hyper_kwargs), then the grad transform."""
    import inspect

    pytest.importorskip("triton")
    from fastopt import triton_kernels

    assert set(triton_kernels.STEPS) == {r.name for r in rules.RULES}
    for rule in rules.RULES:
        params = inspect.signature(triton_kernels.STEPS[rule.name]).parameters
        keyword = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert keyword == ["lr", *rule.hyper, "grad_scale", "clip_value", "clip_coef", "found_inf"], rule.name
