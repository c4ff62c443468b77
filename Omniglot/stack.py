"""R Omniglot TAAN networks in one module, so that R runs train at once.

Every run r is the network of `Omniglot.TAAN.TAAN` with its own parameters; the stack keeps
them as slice r of shared tensors, with the runs as the leading dimension:

    conv l:  weight [R, C_out, C_in, 3, 3], bias [R, C_out], bn.{weight, bias, running_mean,
             running_var} [R, C_out], bn.num_batches_tracked [R], alpha [R, T, M], basis [R, 1, M]
    fc:      weight [R, 512, 1024], bias [R, 512], alpha [R, T, M], basis [R, 1, M]
    heads:   weight [R, T, C_max, 512], bias [R, T, C_max]   (task t's head in rows :C_t;
             the rows past C_t stay 0: their logits are masked, so their gradient is 0)

and computes all runs in one pass:

    convolutions: one grouped convolution (groups = R; run r's images in channel group r),
                  or, for a batch shared by all runs (evaluation), one plain convolution with
                  R * C_out filters;
    batch norm:   per channel of the grouped tensor, so run r's statistics are those of its
                  own images only;
    activation:   one call with grouped bases: run r's alpha and basis on its own rows
                  (see `stacked_tal`);
    fc, heads:    batched matrix products over the runs (and the tasks, for the heads).

A run differs from the others only in its parameters, its regulariser and its weight
lambda_r: the loss of the stack is sum_r (loss_r + lambda_r R_r), so the gradient of run r's
parameters is exactly that of run r alone, and Adam (elementwise) updates every run as its
own optimizer would. `keep(slots, optimizer)` drops the runs that finished, in place (the
parameter objects stay, so the optimizer and the engines keep working).

`run_state_dict(r)` is run r's network as a `TAAN` state_dict (the format of `train.py`'s
files); `TAANStack.from_models(models, lams)` stacks given TAAN networks.

`TAANList` has the same interface for R separate TAAN networks computed one after another,
each exactly as train.py computes it alone (bit for bit; no batching). `build_runs` makes
either, by STACKINGS: 'separate' (TAANList: the default on the CPU, where the grouped
convolutions measured slower than the runs one by one) or 'stacked' (TAANStack: the default
on CUDA). 'union' is the same as 'stacked' (it named a way of batching the activations that
grouped bases replaced) and is accepted for the command lines that name it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import vmap

from Layers import rows_linear, tal_activation
from Layers.TAL_pytorch import tal_regularizer
from Omniglot.TAAN import CHANNELS, FLAT, HIDDEN, TAAN, HeadsAtFactorLR, check_task_ids, multitask_loss

STACKINGS = ("separate", "stacked", "union")


def default_stacking(device):
    """'stacked' on CUDA, 'separate' elsewhere (see the module docstring)."""
    return "stacked" if torch.device(device).type == "cuda" else "separate"


def build_runs(models, lams, stacking):
    """The R runs of `models` (TAAN networks) with weights `lams`, computed as `stacking` says."""
    if stacking == "separate":
        return TAANList(models, lams)
    if stacking not in STACKINGS:
        raise ValueError(f"stacking must be one of {STACKINGS}, got {stacking!r}")
    return TAANStack.from_models(models, lams)


def stacked_tal(a, alpha, basis, task_ids, runs_first):
    """The TAL activation of R runs in one call with grouped bases.

    a: [B, R, ...] (runs_first False: the grouped-convolution layout) or [R, B, ...]; row b
    of run r uses task task_ids[b] of run r's alpha [R, T, M] and basis [R, 1, M]: task
    r * T + t of alpha [R * T, M] with the basis of group r of [R, M]."""
    R, T, M = alpha.shape
    runs = torch.arange(R, device=a.device)[:, None] * T
    rows = (runs + task_ids[None, :]) if runs_first else (task_ids[:, None] + runs.T)
    out = tal_activation(a.reshape(rows.numel(), -1), alpha.reshape(R * T, M), basis.reshape(R, M), rows.reshape(-1))
    return out.view_as(a)


class _BatchNorm(nn.Module):
    """Batch-norm parameters and running statistics of R runs ([R, C] each)."""

    def __init__(self, R, C):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(R, C))
        self.bias = nn.Parameter(torch.zeros(R, C))
        self.register_buffer("running_mean", torch.zeros(R, C))
        self.register_buffer("running_var", torch.ones(R, C))
        self.register_buffer("num_batches_tracked", torch.zeros(R, dtype=torch.long))

    def forward(self, x):
        """x [B, R * C, H, W] (run r in channel group r) -> the same, normalised per run and channel."""
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean.view(-1), self.running_var.view(-1), self.weight.view(-1),
                            self.bias.view(-1), self.training, 0.1, 1e-5)


class _StackedTAL(nn.Module):
    """The shared map of R runs' TAL layers (weight, bias, optional batch norm) and their
    task activations (alpha [R, T, M], basis [R, 1, M])."""

    def __init__(self, R, weight_shape, tasks, basis, bn):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(R, *weight_shape))
        self.bias = nn.Parameter(torch.zeros(R, weight_shape[0]))
        self.alpha = nn.Parameter(torch.zeros(R, tasks, basis))
        self.basis = nn.Parameter(torch.zeros(R, 1, basis))
        if bn:
            self.bn = _BatchNorm(R, weight_shape[0])


class TAANStack(HeadsAtFactorLR, nn.Module):
    """R TAAN networks of the same shape (see the module docstring).

    forward(x, task_ids): x [R, B, 1, H, W] (every run its own images) or [B, 1, H, W] (one
    batch for all runs); task_ids [B], the same for every run. Returns the logits
    [R, B, C_max] of each row's own task, -inf past that task's C_t classes.
    """

    def __init__(self, runs, num_classes, basis, lams, regularizers, c0):
        super().__init__()
        if not len(lams) == len(regularizers) == runs >= 1:
            raise ValueError(f"need one lambda and one regulariser per run: {runs} runs, {len(lams)} lambdas, "
                             f"{len(regularizers)} regularisers")
        self._init_classes(num_classes)
        T = self.num_tasks
        self.lams, self.regularizers, self.c0 = list(lams), list(regularizers), c0
        self.convs = nn.ModuleList(_StackedTAL(runs, (cout, cin, 3, 3), T, basis, bn=True)
                                   for cin, cout in zip(CHANNELS[:-1], CHANNELS[1:]))
        self.fc = _StackedTAL(runs, (HIDDEN, FLAT), T, basis, bn=False)
        self.heads = nn.Module()
        self.heads.weight = nn.Parameter(torch.zeros(runs, T, max(self.num_classes), HIDDEN))
        self.heads.bias = nn.Parameter(torch.zeros(runs, T, max(self.num_classes)))

    @classmethod
    def from_models(cls, models, lams):
        """Stack TAAN networks (parameters and statistics copied); lams: each run's lambda."""
        first = models[0]
        if not all(isinstance(m, TAAN) and m.num_classes == first.num_classes for m in models):
            raise ValueError("all runs must be TAAN networks of the same alphabets")
        layer = first.convs[0]
        stack = cls(len(models), first.num_classes, layer.alpha.shape[1], lams,
                    [m.convs[0].regularize for m in models], layer.c0)
        stack.to(device=layer.weight.device, dtype=layer.weight.dtype)
        for r, model in enumerate(models):
            stack.load_run(r, model.state_dict())
        return stack

    @property
    def runs(self):
        return self.heads.weight.shape[0]

    # ------------------------------------------------------------------ one run as a TAAN
    def _run_tensors(self, r):
        """(TAAN state_dict key, the stack's view of run r's tensor) for every entry."""
        for name, tensor in list(self.named_parameters()) + self._run_buffers():
            if not name.startswith("heads."):
                yield name, tensor[r]
        for t, c in enumerate(self.num_classes):
            yield f"heads.{t}.weight", self.heads.weight[r, t, :c]
            yield f"heads.{t}.bias", self.heads.bias[r, t, :c]

    def run_state_dict(self, r):
        """Run r's network as a TAAN state_dict (copies)."""
        return {key: view.detach().clone() for key, view in self._run_tensors(r)}

    @torch.no_grad()
    def load_run(self, r, state):
        """Put a TAAN state_dict into run r's slice."""
        for key, view in self._run_tensors(r):
            view.copy_(state[key])

    @torch.no_grad()
    def keep(self, slots, optimizer=None):
        """Keep only the runs in `slots` (in that order), in place, with their Adam state."""
        index = torch.as_tensor(slots, dtype=torch.long, device=self.heads.weight.device)
        for tensor in list(self.parameters()) + [b for _, b in self._run_buffers()]:
            state = optimizer.state.get(tensor, {}) if optimizer is not None else {}
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() and value.shape[0] == tensor.shape[0]:
                    state[key] = value.index_select(0, index)
            tensor.data = tensor.data.index_select(0, index)
            tensor.grad = None
        self.lams = [self.lams[s] for s in slots]
        self.regularizers = [self.regularizers[s] for s in slots]

    # ------------------------------------------------------------------ forward
    def forward(self, x, task_ids):
        R, T = self.runs, self.num_tasks
        check_task_ids(task_ids, T)
        shared = x.dim() == 4
        B = x.shape[0] if shared else x.shape[1]
        if task_ids.numel() != B or (not shared and x.shape[0] != R):
            raise ValueError(f"expected x [R={R}, B, 1, H, W] or [B, 1, H, W] with one task id per image, got x "
                             f"{tuple(x.shape)} and {task_ids.numel()} task ids")
        # one batch for all runs: a plain convolution with every run's filters; else run r's
        # images are input channel r of a grouped convolution
        h = x if shared else x.transpose(0, 1).reshape(B, R, *x.shape[3:])
        for layer in self.convs:
            w = layer.weight
            a = F.conv2d(h, w.reshape(-1, *w.shape[2:]), layer.bias.reshape(-1), groups=1 if shared else R)
            shared = False
            a = layer.bn(a)
            h = F.max_pool2d(stacked_tal(a, layer.alpha, layer.basis, task_ids, False), 2)
        h = h.reshape(B, R, FLAT).transpose(0, 1)                              # [R, B, 1024]
        a = torch.baddbmm(self.fc.bias.unsqueeze(1), h, self.fc.weight.transpose(1, 2))
        h = stacked_tal(a, self.fc.alpha, self.fc.basis, task_ids, True)   # [R, B, 512]
        return self._heads(h, task_ids)

    def _heads(self, h, task_ids):
        """Logits [R, B, C_max] of each row's task head, -inf past its classes: head t of run r
        is task r * T + t of one per-row linear map."""
        R, B, T = h.shape[0], h.shape[1], self.num_tasks
        rows = (torch.arange(R, device=h.device)[:, None] * T + task_ids[None, :]).reshape(-1)
        logits = rows_linear(h.reshape(R * B, HIDDEN), rows, self.heads.weight.view(R * T, -1, HIDDEN),
                             self.heads.bias.view(R * T, -1))
        return self.mask_logits(logits.view(R, B, -1), task_ids)

    def _run_buffers(self):
        """(name, buffer) of the runs' own buffers (the class mask is the stack's)."""
        return [(name, b) for name, b in self.named_buffers() if name != "class_mask"]

    # ------------------------------------------------------------------ loss
    def task_losses(self, logits, labels, task_ids):
        """[R] losses: each run's `multitask_loss`. labels [R, B] or [B]."""
        return multitask_loss(logits, labels, task_ids, self.num_tasks)

    def run_losses(self, x, labels, task_ids):
        """[R]: each run's multitask loss on its own batch (x [R, B, 1, H, W], labels [R, B])."""
        return self.task_losses(self(x, task_ids), labels, task_ids)

    @torch.no_grad()
    def run_correct(self, x, labels, task_ids):
        """[R]: how many of the images x [B, 1, H, W] (shared) each run classifies right."""
        return (self(x, task_ids).argmax(-1) == labels).sum(1)

    def regularizations(self):
        """[R]: lambda_r * sum over run r's TAL layers of its regulariser (0 without one)."""
        layers = list(self.convs) + [self.fc]
        alphas = torch.stack([layer.alpha for layer in layers], 1)          # [R, L, T, M]
        bases = torch.stack([layer.basis for layer in layers], 1)           # [R, L, 1, M]
        out = alphas.new_zeros(self.runs)
        for kind in sorted({k for k in self.regularizers if k is not None}):
            slots = [r for r, k in enumerate(self.regularizers) if k == kind and self.lams[r]]
            if not slots:
                continue
            index = torch.tensor(slots, device=alphas.device)
            L = alphas.shape[1]
            values = vmap(lambda a, b: tal_regularizer(kind, a, b, self.c0))(
                alphas[index].flatten(0, 1), bases[index].flatten(0, 1)).view(len(slots), L)
            lams = torch.tensor([self.lams[r] for r in slots], dtype=values.dtype, device=values.device)
            out = out.index_add(0, index, (lams[:, None] * values).sum(1))
        return out

    def regularization(self, c=1.0):
        """c * sum_r lambda_r R_r: what the trainer adds to the loss."""
        return c * self.regularizations().sum()


class Optimizers:
    """Several optimizers stepped, saved and loaded as one."""

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self):
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state):
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(f"the state holds {len(state['optimizers'])} optimizers, this group has "
                             f"{len(self.optimizers)}")
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)


class TAANList(nn.Module):
    """R separate TAAN networks with TAANStack's interface, computed one after another: every
    run's forward, loss, regulariser, gradients and Adam step are those of train.py's run."""

    def __init__(self, models, lams):
        super().__init__()
        self.nets = nn.ModuleList(models)
        self.lams = list(lams)

    @property
    def runs(self):
        return len(self.nets)

    def run_losses(self, x, labels, task_ids):
        return torch.stack([multitask_loss(net(x[r], task_ids), labels[r], task_ids, net.num_tasks)
                            for r, net in enumerate(self.nets)])

    @torch.no_grad()
    def run_correct(self, x, labels, task_ids):
        return torch.stack([(net(x, task_ids).argmax(-1) == labels).sum() for net in self.nets])

    def regularization(self, c=1.0):
        """c * sum_r lambda_r R_r (each run's TAAN.regularization(lambda_r))."""
        terms = [net.regularization(c * lam) for net, lam in zip(self.nets, self.lams) if lam]
        return sum(terms[1:], terms[0]) if terms else 0.

    def make_optimizer(self, lr):
        return Optimizers(net.make_optimizer(lr) for net in self.nets)

    def keep(self, slots, optimizer=None):
        """Keep only the runs in `slots` (in that order), with their optimizers."""
        self.nets = nn.ModuleList(self.nets[s] for s in slots)
        self.lams = [self.lams[s] for s in slots]
        if optimizer is not None:
            optimizer.optimizers = [optimizer.optimizers[s] for s in slots]

    def run_state_dict(self, r):
        return {key: value.detach().clone() for key, value in self.nets[r].state_dict().items()}
