"""Docstring fragments shared by the optimizer classes (torch.optim's style)."""

EXTRAS_DOC = r"""
    fastopt extras (keyword-only, the same for every fastopt optimizer):
        max_grad_norm (float, optional): clip the global gradient norm over all parameters of
            the optimizer (every param group) to this value before the update: the same result
            as ``torch.nn.utils.clip_grad_norm_(all_params, max_grad_norm, norm_type)`` followed
            by the step, without writing ``param.grad``. The pre-clip norm is kept, as a device
            tensor, in ``optimizer.last_grad_norm``. (default: None, no clipping)
        norm_type (float, optional): 2.0 or ``inf`` (default: 2.0)
        clip_value (float, optional): clamp every gradient element to ``[-clip_value,
            clip_value]`` first, as ``clip_grad_value_`` would (default: None)
        error_if_nonfinite (bool, optional): with ``max_grad_norm``, raise (as
            ``clip_grad_norm_(..., error_if_nonfinite=True)`` does) when the total norm is inf or
            NaN, changing nothing; this costs one host sync per step. A step that a GradScaler
            skips for inf/NaN gradients does not raise. (default: False)
        master_weights (bool, optional): keep an fp32 copy of every fp16/bf16 parameter in
            ``state['master_param']`` and fp32 optimizer state; the update runs on the copy and
            the parameter becomes the copy rounded to its dtype. A parameter written outside the
            optimizer (``model.load_state_dict``, an in-place op, ``p.data = ...``) re-seeds its
            copy at the next step; a write through ``p.data`` in place (``p.data.copy_(x)``) is
            not seen and is undone by the next step (default: False)
        state_dtype (torch.dtype, optional): ``torch.bfloat16`` stores the state tensors
            (moments, sums, buffers) in bfloat16, computed in float32 and written back with
            deterministic stochastic rounding keyed by ``state['seed']``, the step and the
            element (default: None, the params' dtype, float32 with master weights)
        compensation (str, optional): how fp16/bf16 parameters without master weights are
            stored: ``"kahan"`` keeps ``state['compensation']`` (the param's dtype), the rounding
            error of the last store, and updates ``param + compensation``, so that updates
            smaller than the param's precision accumulate; ``"stochastic"`` (bf16 params) rounds
            the param stochastically as ``state_dtype`` rounds the state. Other parameters are
            stored as without it; it cannot be combined with ``master_weights`` (default: None,
            round to nearest as torch.optim)
        backend (str, optional): ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or
            ``"cuda"``; see ``fastopt.available_backends`` (default: ``"auto"``)
        foreach, fused, capturable: torch.optim's flags, accepted so that code written for
            torch.optim runs unchanged; fastopt always runs its own fused step and never syncs
            with the host. ``differentiable=True`` raises NotImplementedError.

    Under ``torch.amp.GradScaler`` the step unscales the gradients itself and, when the scaler
    found inf/NaN, changes nothing (parameters, state and step count), without a host sync.
"""
