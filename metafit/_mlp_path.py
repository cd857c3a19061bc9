"""The ``"mlp"`` forward strategy: a hand-batched :class:`metafit.models.MLP` forward and
its analytic loss gradient.

The gradient of the MSE and cross-entropy losses is computed by explicit backpropagation
with batched matrix products. The result is an ordinary differentiable expression, so
second-order MAML needs a single backward pass instead of a double backward. It equals
``torch.autograd.grad`` to rounding (tested in float64). :meth:`MLPPath.prepare` does, once
per inner loop, what every step shares (targets, one-hot classes, the frozen layers before
the first adapted one) and leaves the loss's constant factor to the update, which folds it
into the step size: about 20 tensor operations per step for a 2-hidden-layer MLP.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metafit._inner_types import LowRankWeight, Params, PreparedGradFn
from metafit.losses import cross_entropy_loss, mse_loss

__all__ = ["MLPPath", "MLPGradient", "PreparedGrad"]


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "elu": F.elu,
}


def _kernel(op):
    """The C++ entry point of an aten overload, else the overload itself.

    The Python wrapper costs a frame per call, a measurable share of a few-microsecond
    operation.
    """
    return getattr(op, "_op", op)


_tanh_backward = _kernel(torch.ops.aten.tanh_backward.default)
_sigmoid_backward = _kernel(torch.ops.aten.sigmoid_backward.default)
_gelu_backward = _kernel(torch.ops.aten.gelu_backward.default)
_elu_backward = _kernel(torch.ops.aten.elu_backward.default)
_sign = _kernel(torch.ops.aten.sign.default)
_threshold_backward = _kernel(torch.ops.aten.threshold_backward.default)


def _relu_grad(d: Tensor, a: Tensor) -> Tensor:
    """``d * relu'(z)`` from the output ``a = relu(z)``: ``d`` times the detached 0/1 mask
    ``sign(a)``.

    The same values as ``threshold_backward(d, a, 0)``, but a cheaper second-order graph:
    the mask is constant, so the backward is one multiplication, where threshold_backward's
    adds a zero gradient for ``a`` and, with the transposed gradient that a weight
    gradient ``d^T a`` sends back to ``d``, runs a strided kernel up to 25x slower
    (``python benchmarks/sinusoid.py --compare``, 20-128-128-1: 1.2x faster meta-steps).
    Without a graph (``fit``, first order) it is threshold_backward: one kernel, not two.
    """
    if not torch.is_grad_enabled():
        return _threshold_backward(d, a, 0)
    return d * _sign(a.detach())


# Derivatives as (grad, saved) -> grad * act'(z), one kernel each and no Python frame where
# possible. ``saved`` is the activation's output a, or its input z for the activations in
# _SAVES_INPUT. The aten backward kernels are themselves differentiable, which
# second-order MAML needs.
_ACTIVATION_GRADS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "relu": _relu_grad,
    "tanh": _tanh_backward,
    "sigmoid": _sigmoid_backward,
    "gelu": functools.partial(_gelu_backward, approximate="none"),
    "elu": lambda d, z: _elu_backward(d, 1.0, 1, 1, False, z),
}
_SAVES_INPUT = frozenset({"gelu", "elu"})


def _linear(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``h @ w.T + b`` for batched ``h`` (T, n, in) and shared or batched ``w``, ``b``.

    With a shared ``w`` and ``b`` this is one ``F.linear``, whatever the dimensions of
    ``h`` (a single task's ``(n, in)`` too).
    """
    if type(w) is LowRankWeight:  # adapted by the low-rank inner loop
        return w.linear(h, b)
    if w.dim() == 2:
        if b.dim() == 1:
            return F.linear(h, w, b)
        return F.linear(h, w) + b.unsqueeze(1)
    return torch.baddbmm(b.unsqueeze(-2), h, w.mT)


def _back(d: Tensor, w: Tensor) -> Tensor:
    """``d @ w`` for batched output gradients ``d`` (T, n, out) and shared, batched or
    factored ``w``: the gradient at a layer's input."""
    if type(w) is LowRankWeight:
        return w.backward_input(d)
    return torch.matmul(d, w) if w.dim() == 2 else torch.bmm(d, w)


#: A prepared gradient: ``step(params, scale=None) -> raw gradients`` (a list in the order
#: of the adapted names) and the constant ``factor``; the gradient of the summed loss is
#: ``factor * raw``, and ``step(params, s)`` returns ``s * raw``. See
#: :meth:`MLPGradient.prepare`.
PreparedGrad = tuple[Callable[[Mapping[str, Tensor]], list[Tensor]], float]


class MLPPath:
    """Hand-batched forward and analytic loss gradient of :class:`metafit.models.MLP`."""

    def __init__(self, names: Sequence[tuple[str, str]], activation: str):
        self.names = list(names)
        self.act = _ACTIVATIONS[activation]
        self.act_grad = _ACTIVATION_GRADS[activation]
        self.saves_input = activation in _SAVES_INPUT
        self._plans: dict[tuple[str, ...], tuple] = {}

    def _plan(self, names: Sequence[str]) -> tuple:
        """``(first, layers)`` for the adapted ``names``, computed once per name set.

        ``first`` is the first layer with an adapted parameter; ``layers`` lists, from
        there on, each layer's index from ``first``, weight and bias names, and the
        positions of their gradients in the result (None where not adapted).
        """
        key = tuple(names)
        plan = self._plans.get(key)
        if plan is None:
            slot = {k: i for i, k in enumerate(key)}
            need = [w in slot or b in slot for w, b in self.names]
            first = need.index(True) if any(need) else len(self.names)
            layers = [
                (i - first, w, b, slot.get(w), slot.get(b))
                for i, (w, b) in enumerate(self.names)
            ][first:]
            plan = self._plans[key] = (first, layers)
        return plan

    def forward(self, params: Mapping[str, Tensor], X: Tensor) -> Tensor:
        h = X.flatten(2) if X.dim() > 3 else X
        last = len(self.names) - 1
        for i, (w, b) in enumerate(self.names):
            h = _linear(h, params[w], params[b])
            if i < last:
                h = self.act(h)
        return h

    def prepare(
        self,
        loss_fn: Callable,
        params: Mapping[str, Tensor],
        X: Tensor,
        y: Tensor,
        names: Sequence[str],
        single: bool = False,
        mask: Tensor | None = None,
    ) -> PreparedGrad:
        """Precompute what every inner step shares; return the step's gradient function.

        Done once per inner loop: the flattened inputs, the targets in the shape of the
        outputs (or the one-hot classes), and the activations of the layers before the
        first adapted one (ANIL's frozen body), which no step changes. The loss's constant
        factor (``2 / numel`` for the MSE, ``1 / n`` for the mean cross-entropy) is left
        to the caller, who folds it into the step size: one operation less per step.

        With ``single``, ``X`` and ``y`` hold one task (``T = 1``) and every parameter has
        its module shape: the task dimension is dropped and each layer is one
        ``F.linear`` forward and two ``mm`` backward, without batched kernels.
        """
        first, plan = self._plan(names)
        if not plan:
            return (lambda current, scale=None, factored=frozenset(), update=False: []), 1.0
        if single:
            X, y = X[0], y[0]
            mask = None if mask is None else mask[0]
            h = X.flatten(1) if X.dim() > 2 else X
        else:
            h = X.flatten(2) if X.dim() > 3 else X
        for w, b in self.names[:first]:  # the frozen body: once, not every step
            h = self.act(_linear(h, params[w], params[b]))
        body = h
        n, n_out = h.shape[-2], params[self.names[-1][0]].shape[-2]
        output_grad, target, factor = _output_gradient(loss_fn, y, h, n, n_out)
        if mask is not None:
            output_grad, factor = _masked(output_grad, target, factor, n, mask, h.dtype)
        return self._step_function(plan, body, output_grad, target, len(names), single), factor

    def _step_function(self, plan, body, output_grad, target, n_names: int, single: bool):
        """The step of :meth:`prepare`: ``step(current, scale=None, factored=frozenset(),
        update=False)``, one forward and the analytic backward of ``plan``'s layers."""
        act, act_grad, keep_pre = self.act, self.act_grad, self.saves_input
        if single:  # module-shaped parameters: plain 2-D kernels
            linear, mm, addmm, back = F.linear, torch.mm, torch.addmm, torch.mm
        else:  # batched; these also take the low-rank loop's factored weights
            linear, mm, addmm, back = _linear, torch.bmm, torch.baddbmm, _back
        backward_plan = plan[::-1]
        hidden = len(plan) - 1

        def step(
            current: Mapping[str, Tensor],
            scale: float | None = None,
            factored=frozenset(),
            update: bool = False,
        ) -> list[Tensor]:
            # inputs[j] is layer j's input, so inputs[j] (j >= 1) is also the activation
            # output of layer j - 1; pre holds the activation inputs where they are needed.
            # The weights named in ``factored`` get their gradient as the pair (D, A) of
            # output gradients and inputs, D^T A (the low-rank loop keeps the factors).
            # With ``update`` the results are the updated parameters current + (scaled)
            # gradient, a weight's in one (b)addmm: in a second-order graph, one
            # parameter-sized tensor and one node less per layer and step.
            h = body
            inputs, pre = [], []
            for j, w, b, _, _ in plan:
                inputs.append(h)
                h = linear(h, current[w], current[b])
                if j < hidden:
                    if keep_pre:
                        pre.append(h)
                    h = act(h)
            d = h - target if output_grad is None else output_grad(h)
            if scale is not None:
                d = d * scale
            grads = [None] * n_names
            for j, w, b, sw, sb in backward_plan:
                if sw is not None:
                    if w in factored:
                        grads[sw] = (d, inputs[j])
                    elif update:
                        grads[sw] = addmm(current[w], d.mT, inputs[j])
                    else:
                        grads[sw] = mm(d.mT, inputs[j])
                if sb is not None:
                    grads[sb] = current[b] + d.sum(-2) if update else d.sum(-2)
                if j:
                    d = act_grad(back(d, current[w]), pre[j - 1] if keep_pre else inputs[j])
            return grads

        return step


def _output_gradient(loss_fn: Callable, y: Tensor, h: Tensor, n: int, n_out: int):
    """``(output_grad, target, factor)`` of a built-in loss: the loss's gradient at the
    outputs is ``factor * output_grad(out)``, or ``factor * (out - target)`` when
    ``output_grad`` is None (the MSE's common case)."""
    column = y.dim() == h.dim() - 1  # one target per example
    if loss_fn is mse_loss:
        target = y.unsqueeze(-1) if column else y
        factor = 2.0 / (n if column else n * y.shape[-1])
        if column and n_out > 1:  # only the first output is compared

            def first_output(out):
                return F.pad(out[..., :1] - target, (0, n_out - 1))

            return first_output, target, factor
        return None, target, factor
    if loss_fn is cross_entropy_loss:
        onehot = F.one_hot(y, n_out).to(h.dtype)

        def softmax_grad(out):
            return torch.softmax(out, -1) - onehot

        return softmax_grad, None, 1.0 / n
    # make_grad_fn only builds the analytic path for the losses above
    raise ValueError(f"no analytic gradient for the loss {loss_fn!r}.")  # pragma: no cover


def _masked(output_grad, target, factor: float, n: int, mask: Tensor, dtype):
    """The output gradient of the masked mean loss: each row's gradient times
    ``n * mask / count`` (its weight relative to the unmasked mean's ``1 / n``)."""
    weight = (mask * (n / mask.sum(-1, keepdim=True))).to(dtype).unsqueeze(-1)
    if output_grad is None:
        return (lambda out: (out - target) * weight), factor
    return (lambda out: output_grad(out) * weight), factor


class MLPGradient(PreparedGradFn):
    """The ``"mlp"`` strategy's :data:`GradFn`, plus :meth:`prepare` for the inner loop."""

    def __init__(self, path: MLPPath, loss_fn: Callable):
        self.path = path
        self.loss_fn = loss_fn

    def __call__(self, params, X, y, names, scale=None, mask=None) -> Params:
        names = list(names)
        step, factor = self.path.prepare(self.loss_fn, params, X, y, names, mask=mask)
        c = factor * (1.0 if scale is None else float(scale))
        return dict(zip(names, step(params, c)))

    def prepare(self, params, X, y, names, single: bool = False, mask=None) -> PreparedGrad:
        """See :meth:`MLPPath.prepare`; :func:`inner_loop` calls this once per loop."""
        return self.path.prepare(self.loss_fn, params, X, y, names, single, mask)
