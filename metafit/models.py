"""Built-in networks.

:class:`MLP` is the default model of the estimators and has a hand-batched fast path in
:mod:`metafit.functional`. Any other ``nn.Module`` works through the generic paths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metafit._checks import check_int

__all__ = ["MLP", "Conv4", "ContextMLP", "MemberModules", "is_stateless"]

_ACTIVATION_NAMES = ("relu", "tanh", "sigmoid", "gelu", "elu")


def is_stateless(module: nn.Module) -> bool:
    """Whether ``module``'s forward draws no random numbers, behaves the same in train and
    eval mode, and is never changed by adaptation: exactly the built-in :class:`MLP` (a
    subclass may add dropout). Learners of such modules are shared between threads, and
    their fits and predictions skip seeding and mode switches. An ensemble's modules are
    stateless when each member's is."""
    if type(module) is MemberModules:
        return all(is_stateless(m) for m in module)
    return type(module) is MLP


class MemberModules(nn.ModuleList):
    """The networks of an ensemble's members (:mod:`metafit.ensemble`), one module for
    the thread count, mode switches and the statelessness check of ``fit``."""


class MLP(nn.Module):
    """A fully connected network: ``Linear -> activation -> ... -> Linear``.

    Parameters
    ----------
    n_inputs : int
        Input features; inputs with more than one trailing dimension are flattened.
    n_outputs : int
        Outputs (1 for scalar regression, the number of classes for classification).
    hidden_sizes : sequence of int, default=(40, 40)
        Widths of the hidden layers; empty for a linear model.
    activation : {"relu", "tanh", "sigmoid", "gelu", "elu"}, default="relu"
        Non-linearity between layers.

    Examples
    --------
    >>> net = MLP(1, 1, (40, 40))
    >>> net(torch.zeros(3, 1)).shape
    torch.Size([3, 1])
    """

    preferred_forward = "mlp"

    def __init__(
        self,
        n_inputs: int,
        n_outputs: int,
        hidden_sizes: Sequence[int] = (40, 40),
        activation: str = "relu",
    ):
        super().__init__()
        if activation not in _ACTIVATION_NAMES:
            raise ValueError(
                f"activation must be one of {', '.join(_ACTIVATION_NAMES)}; got {activation!r}."
            )
        sizes = [
            check_int("n_inputs", n_inputs),
            *(check_int(f"hidden_sizes[{i}]", h) for i, h in enumerate(hidden_sizes)),
            check_int("n_outputs", n_outputs),
        ]
        self.n_inputs, self.n_outputs = sizes[0], sizes[-1]
        self.hidden_sizes = tuple(sizes[1:-1])
        self.activation = activation
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def weight_bias_names(self) -> list[tuple[str, str]]:
        """``(weight, bias)`` parameter names of each layer, input to output."""
        return [(f"layers.{i}.weight", f"layers.{i}.bias") for i in range(len(self.layers))]

    def head_parameter_names(self) -> list[str]:
        """Parameter names of the output layer (what ANIL adapts)."""
        return list(self.weight_bias_names()[-1])

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h = X.flatten(1) if X.dim() > 2 else X
        act = getattr(torch, self.activation, None) or getattr(nn.functional, self.activation)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = act(h)
        return h


class ContextMLP(nn.Module):
    """An :class:`MLP` whose input is the row and a small context vector: CAVIA's network.

    The ``context`` parameter (zeros at the start) is what CAVIA adapts per task; the
    MLP's weights are shared and meta-learned.

    Parameters
    ----------
    n_inputs, n_outputs, hidden_sizes, activation
        As for :class:`MLP` (which gets ``n_inputs + context_size`` inputs).
    context_size : int, default=4
        Length of the context vector.

    Examples
    --------
    >>> net = ContextMLP(2, 1, (16,), context_size=3)
    >>> net(torch.zeros(5, 2)).shape, net.context.shape
    (torch.Size([5, 1]), torch.Size([3]))
    """

    preferred_forward = "vmap"

    def __init__(
        self,
        n_inputs: int,
        n_outputs: int,
        hidden_sizes: Sequence[int] = (40, 40),
        activation: str = "relu",
        context_size: int = 4,
    ):
        super().__init__()
        self.context_size = check_int("context_size", context_size)
        self.context = nn.Parameter(torch.zeros(self.context_size))
        self.mlp = MLP(check_int("n_inputs", n_inputs) + self.context_size, n_outputs,
                       hidden_sizes, activation)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h = X.flatten(1) if X.dim() > 2 else X
        return self.mlp(torch.cat([h, self.context.expand(len(h), -1)], dim=1))


# --------------------------------------------------------------------------- Conv4

_DOWNSAMPLING = ("stride", "maxpool")
_POOLING = ("mean", "flatten")
#: Ways :meth:`Conv4.batched_forward` can batch the tasks' convolutions.
CONV4_KERNELS = ("auto", "loop", "grouped", "hybrid")
_BN_EPS = 1e-5


def _batch_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """BatchNorm of ``h`` (n, C, H, W) with its own batch statistics, in plain tensor ops.

    Used by :meth:`Conv4.forward`, which the generic ``"vmap"`` strategy runs under
    :func:`torch.func.vmap`: there, second-order gradients of ``F.batch_norm`` were found
    to differ from the per-task loop (about 6e-3 relative in float64), while these ops
    agree to rounding error. Outside vmap ``F.batch_norm`` is exact and faster, and
    :meth:`Conv4.batched_forward` uses it.
    """
    mean = h.mean((0, 2, 3), keepdim=True)
    var = (h - mean).pow(2).mean((0, 2, 3), keepdim=True)
    scale = weight.view(1, -1, 1, 1) * torch.rsqrt(var + _BN_EPS)
    return (h - mean) * scale + bias.view(1, -1, 1, 1)


class Conv4(nn.Module):
    """The four-block convolutional network of few-shot learning (Vinyals et al. 2016).

    Each block is a 3x3 convolution with ``hidden_channels`` filters, BatchNorm, ReLU and a
    2x down-sampling; a linear head follows. With the defaults (stride-2 convolutions,
    features averaged over the last 2x2 positions) it is the Omniglot network of the
    reference MAML implementation and of learn2learn's ``OmniglotCNN``, with the same
    initialization (Xavier-uniform convolutions, uniform BatchNorm scales, standard-normal
    head).

    BatchNorm always normalizes with the statistics of the batch at hand (no running
    statistics; learnable scale and shift), as in the reference MAML. In
    :meth:`batched_forward` the statistics of each task come from that task's own
    examples, so nothing leaks between the tasks of a meta-batch; meta-training and
    ``fit`` normalize with the support set, prediction with the query batch.

    Parameters
    ----------
    n_outputs : int
        Number of classes (outputs of the head).
    input_shape : sequence of 3 ints, default=(1, 28, 28)
        ``(channels, height, width)`` of one example; flattened inputs of
        ``prod(input_shape)`` features are reshaped to it.
    hidden_channels : int, default=64
        Filters of every convolution.
    n_blocks : int, default=4
        Convolutional blocks.
    downsampling : {"stride", "maxpool"}, default="stride"
        Halve the resolution with stride-2 convolutions (reference MAML on Omniglot) or
        with 2x2 max-pooling after stride-1 convolutions (reference MAML on MiniImagenet).
    pooling : {"mean", "flatten"}, default="mean"
        Average the last feature map over its positions, or flatten it, for the head.
    bn_steps : int or None, default=None
        MAML++ per-step BatchNorm: ``bn_steps`` sets of BatchNorm scales and shifts, one
        per inner step (see :class:`metafit.algorithms.MAMLPlusPlus`); None keeps one set.
    kernel : {"auto", "loop", "grouped", "hybrid"}, default="auto"
        How :meth:`batched_forward` batches the tasks: a loop of per-task convolutions,
        grouped convolutions with the tasks folded into the channels (``groups=T``), or
        grouped for small per-task batches (support sets) and the loop for large ones.
        "auto" is "loop" on a CPU with 32 filters or more, else "grouped"
        (docs/omniglot.md has the measurements).

    Examples
    --------
    >>> net = Conv4(5)
    >>> net(torch.zeros(10, 1, 28, 28)).shape
    torch.Size([10, 5])
    """

    #: :func:`metafit.functional.make_forward` uses :meth:`batched_forward`.
    preferred_forward = "module"
    #: BatchNorm with the statistics of the rows at hand: padding rows would change them
    rows_independent = False

    def __init__(
        self,
        n_outputs: int,
        input_shape: Sequence[int] = (1, 28, 28),
        hidden_channels: int = 64,
        n_blocks: int = 4,
        downsampling: str = "stride",
        pooling: str = "mean",
        bn_steps: int | None = None,
        kernel: str = "auto",
    ):
        super().__init__()
        try:
            shape = tuple(int(s) for s in input_shape)
        except (TypeError, ValueError):
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(
                f"input_shape must be (channels, height, width) of positive ints, got "
                f"{input_shape!r}; e.g. (1, 28, 28) for Omniglot."
            )
        check_int("n_outputs", n_outputs)
        check_int("hidden_channels", hidden_channels)
        check_int("n_blocks", n_blocks)
        if downsampling not in _DOWNSAMPLING:
            raise ValueError(f"downsampling must be 'stride' or 'maxpool', got {downsampling!r}.")
        if pooling not in _POOLING:
            raise ValueError(f"pooling must be 'mean' or 'flatten', got {pooling!r}.")
        check_int("bn_steps", bn_steps, allow=(None,))
        if kernel not in CONV4_KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(CONV4_KERNELS)}; got {kernel!r}.")
        self.n_outputs = n_outputs
        self.input_shape = shape
        self.hidden_channels = hidden_channels
        self.n_blocks = n_blocks
        self.downsampling = downsampling
        self.pooling = pooling
        self.bn_steps = bn_steps
        self.kernel = kernel
        self._stride = 2 if downsampling == "stride" else 1
        channels = [shape[0]] + [hidden_channels] * n_blocks
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=self._stride, padding=1)
            for a, b in zip(channels, channels[1:])
        )
        bn_shape = (hidden_channels,) if bn_steps is None else (bn_steps, hidden_channels)
        self.norms = nn.ModuleList(_AffineNorm(bn_shape) for _ in range(n_blocks))
        h, w = shape[1:]
        for _ in range(n_blocks):
            h, w = (h + 1) // 2, (w + 1) // 2
        n_features = hidden_channels * (1 if pooling == "mean" else h * w)
        self.head = nn.Linear(n_features, n_outputs)
        for conv in self.convs:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self._ndim = {name: p.dim() for name, p in self.named_parameters()}

    # ------------------------------------------------------------------ names and checks

    def head_parameter_names(self) -> list[str]:
        """Parameter names of the linear head (what ANIL adapts)."""
        return ["head.weight", "head.bias"]

    def norm_parameter_names(self) -> list[str]:
        """Parameter names of the BatchNorm scales and shifts."""
        return [f"norms.{i}.{k}" for i in range(self.n_blocks) for k in ("weight", "bias")]

    def _bn_index(self, step: int | None) -> int | None:
        if self.bn_steps is None:
            return None
        return 0 if step is None else min(int(step), self.bn_steps - 1)

    def _as_images(self, X: torch.Tensor, lead: int) -> torch.Tensor:
        shape = tuple(X.shape[lead:])
        if shape == self.input_shape:
            return X
        if math.prod(shape) == math.prod(self.input_shape) and len(shape) in (1, 3):
            return X.reshape(*X.shape[:lead], *self.input_shape)
        raise ValueError(
            f"Conv4 expects examples of shape {self.input_shape} or "
            f"{math.prod(self.input_shape)} flattened features, got {shape}; "
            "set input_shape=(channels, height, width)."
        )

    # ------------------------------------------------------------------ plain forward

    def forward(self, X: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Logits of one batch ``X`` of shape (n, C, H, W) or (n, C*H*W).

        BatchNorm uses the statistics of ``X`` itself; ``step`` picks the per-step set of
        BatchNorm parameters when ``bn_steps`` is set (default the first).
        """
        h = self._as_images(X, 1)
        j = self._bn_index(step)
        for conv, norm in zip(self.convs, self.norms):
            weight = norm.weight if j is None else norm.weight[j]
            bias = norm.bias if j is None else norm.bias[j]
            h = torch.relu(_batch_norm(conv(h), weight, bias))
            if self.downsampling == "maxpool":
                h = F.max_pool2d(h, 2, ceil_mode=True)
        h = h.mean((2, 3)) if self.pooling == "mean" else h.flatten(1)
        return self.head(h)

    # ------------------------------------------------------------------ batched forward

    def resolve_kernel(self, device: torch.device | str) -> str:
        """The kernel used on ``device``: ``kernel`` unless it is "auto"."""
        if self.kernel != "auto":
            return self.kernel
        # Measured on a CPU (docs/omniglot.md): with 32 filters or more the convolutions
        # dominate and the loop is as fast or faster (64: 25.0 vs 18.7 tasks/s); with
        # fewer, per-task overheads dominate and "grouped" wins (8: 2x). On a GPU the
        # per-task loop is bound by kernel launches.
        if torch.device(device).type == "cpu" and self.hidden_channels >= 32:
            return "loop"
        return "grouped"

    def batched_forward(
        self, params: dict[str, torch.Tensor], X: torch.Tensor, step: int | None = None
    ) -> torch.Tensor:
        """Logits of ``T`` tasks at once, each with its own parameters.

        Parameters
        ----------
        params : dict of str to Tensor
            The module's parameters, each with a leading task dimension ``T`` or shared
            (module shape) by all tasks.
        X : Tensor of shape (T, n, C, H, W) or (T, n, C*H*W)
        step : int, optional
            Inner step, for per-step BatchNorm.

        Returns
        -------
        Tensor of shape (T, n, n_outputs)
        """
        X = self._as_images(X, 2)
        kernel = self.resolve_kernel(X.device)
        if kernel == "hybrid":
            kernel = "grouped" if X.shape[1] <= 25 else "loop"
        j = self._bn_index(step)
        if kernel == "grouped":
            feats = self._grouped(params, X, j)
        else:
            feats = self._loop(params, X, j)
        weight, bias = params["head.weight"], params["head.bias"]
        if weight.dim() == 2:
            return F.linear(feats, weight, bias)
        return torch.baddbmm(bias.unsqueeze(1), feats, weight.transpose(1, 2))

    def _param(self, params, name: str, T: int, j: int | None = None) -> torch.Tensor:
        """``params[name]`` with the task dimension (expanded if shared), step ``j``."""
        p = params[name]
        if p.dim() == self._ndim[name]:
            p = p.unsqueeze(0).expand(T, *p.shape)
        return p if j is None else p[:, j]

    def _grouped(self, params, X: torch.Tensor, j: int | None) -> torch.Tensor:
        # The tasks are folded into the channels, (n, T*C, H, W), and every convolution
        # runs with groups=T. Each channel belongs to one task, so BatchNorm's
        # per-channel batch statistics are per-task statistics.
        T, n = X.shape[:2]
        h = X.transpose(0, 1).reshape(n, T * X.shape[2], *X.shape[3:])
        if h.device.type == "cpu":
            h = h.contiguous(memory_format=torch.channels_last)
        for i in range(self.n_blocks):
            w = self._param(params, f"convs.{i}.weight", T)
            b = self._param(params, f"convs.{i}.bias", T)
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), self._stride, 1, 1, T)
            gamma = self._param(params, f"norms.{i}.weight", T, j).reshape(-1)
            beta = self._param(params, f"norms.{i}.bias", T, j).reshape(-1)
            h = torch.relu(F.batch_norm(h, None, None, gamma, beta, True, 0.0, _BN_EPS))
            if self.downsampling == "maxpool":
                h = F.max_pool2d(h, 2, ceil_mode=True)
        if self.pooling == "mean":
            return h.mean((2, 3)).view(n, T, -1).transpose(0, 1)
        return h.reshape(n, T, self.hidden_channels, -1).flatten(2).transpose(0, 1)

    def _loop(self, params, X: torch.Tensor, j: int | None) -> torch.Tensor:
        T = X.shape[0]
        # unbind, not p[t]: its backward stacks the T gradients once, where T selections
        # would each write a zero-filled (T, ...) gradient.
        blocks = [
            tuple(
                self._param(params, f"{kind}.{i}.{part}", T, j if kind == "norms" else None).unbind(
                    0
                )
                for kind, part in (
                    ("convs", "weight"),
                    ("convs", "bias"),
                    ("norms", "weight"),
                    ("norms", "bias"),
                )
            )
            for i in range(self.n_blocks)
        ]
        feats = []
        for t, h in enumerate(X.unbind(0)):
            for w, b, gamma, beta in blocks:
                h = F.conv2d(h, w[t], b[t], self._stride, 1)
                h = torch.relu(F.batch_norm(h, None, None, gamma[t], beta[t], True, 0.0, _BN_EPS))
                if self.downsampling == "maxpool":
                    h = F.max_pool2d(h, 2, ceil_mode=True)
            feats.append(h.mean((2, 3)) if self.pooling == "mean" else h.flatten(1))
        return torch.stack(feats)


class _AffineNorm(nn.Module):
    """The learnable scale and shift of a BatchNorm layer (statistics come from the batch)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        # uniform(0, 1) scales, as learn2learn's MAML networks
        self.weight = nn.Parameter(torch.rand(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
