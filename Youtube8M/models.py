"""Multi-task models for the Youtube-8M video-level experiment (README, "Youtube-8M").

Every model maps one batch per task to one batch of logits per task:

    model(xs) -> logits,   xs[t]: [B_t, in_features],   logits[t]: [B_t, num_classes[t]]

All models have three hidden layers of width `hidden_feature` with ReLU (no batch norm,
no dropout, as in the original code) and one `nn.Linear(hidden_feature, C_t)` head per
task. Weights use `nn.Linear`'s default initialisation unless a docstring says otherwise.

A training step (README, "Trainer command line") is

    total, per_task = multitask_loss(model(xs), ys)      # mean over tasks of BCE * C_t
    loss = total + model.regularization(c)                 # once per step, not per task

and then `model.after_step(iteration)` where a model has it (MRN: `update()` every
`update_interval` steps).

Unlike the original code, which called the model once per task, every model here runs
all tasks of a step at once: models whose hidden layers are shared by all rows
(Hard3, SoftOrder, MMoE, CrossStitch, TAAN) concatenate the tasks' batches and keep a
task id per row; models with per-task weights (STL, MRN, DMTRL) stack the batches into
[T, B, in] (zero-padded to the largest batch when the sizes differ) and use batched
matrix products. A task may have an empty batch: to evaluate task t alone, pass
`[x if j == t else x[:0] for j in range(T)]`; it costs one task's compute.

Differences from the original code (yingrliu/TAAN-MTL, Youtube8M/models.py):
  * in_features is an argument (the original hard-codes 1152); any number of tasks.
  * one call for all tasks (the original: one forward per task; per-task regularisers
    were added T times and divided by T, which equals adding them once, as we do).
  * SoftOrder's S is [T, 2, 2] (the original hard-codes 16 tasks).
  * DMTRL puts a ReLU after each DMTRL layer (the original has none: a linear model).
  * MRN: the trainer calls update() every update_interval steps (the original never did).
  * STL, CrossStitch and MMoE keep their per-task/per-expert layers as stacked tensors
    [n, in, out] (same initialisation), so their state dicts differ from the original's.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from Layers import DMTRL_Linear, MRN_Linear, TAL_Linear

MODELS = ('STL', 'Hard3', 'MRN', 'SoftOrder', 'DMTRL', 'CrossStitch', 'MMoE', 'TAAN')


# ----------------------------------------------------------------------------------------
# helpers

def concat_tasks(xs):
    """Concatenate the tasks' batches: returns x [N, in], task_ids [N] (long), sizes."""
    sizes = [x.shape[0] for x in xs]
    x = torch.cat(list(xs), dim=0)
    # made on the CPU and copied without waiting: a list copied to a GPU would stall its queue
    task_ids = torch.repeat_interleave(torch.arange(len(xs)), torch.tensor(sizes), output_size=x.shape[0])
    task_ids = task_ids.to(x.device, non_blocking=True)
    return x, task_ids, sizes


def stack_tasks(xs):
    """Stack the non-empty batches into [k, B_max, in] (shorter ones zero-padded).

    Returns that tensor and the list of the k tasks it holds (all tasks with rows), so
    that evaluating one task at a time (the other batches empty) costs one task's compute.
    """
    present = [t for t, x in enumerate(xs) if x.shape[0] > 0] or [0]
    b_max = max(xs[t].shape[0] for t in present)
    if all(xs[t].shape[0] == b_max for t in present):
        return torch.stack([xs[t] for t in present], dim=0), present
    out = xs[0].new_zeros((len(present), b_max, xs[0].shape[1]))
    for j, t in enumerate(present):
        out[j, :xs[t].shape[0]] = xs[t]
    return out, present


def unstack_tasks(h, xs, present):
    """Inverse of stack_tasks for an output h [k, B_max, out]: one [B_t, out] per task."""
    out = [h.new_zeros(0, h.shape[-1]) for _ in xs]
    # unbind, not h[j]: the backward of unbind stacks the k gradients once, while each
    # h[j] would scatter its gradient into a zero tensor of h's full size
    for t, rows in zip(present, h.unbind(0)):
        n = xs[t].shape[0]
        out[t] = rows if n == rows.shape[0] else rows[:n]
    return out


class StackedLinear(nn.Module):
    """n independent linear maps held as one tensor: y_j = x_j W_j + b_j, j = 1..n.

    weight [n, in, out], bias [n, 1, out], each initialised like `nn.Linear(in, out)`
    (uniform in +-1/sqrt(in)). Input [n, B, in] (one input per map) -> [n, B, out] with one
    batched product; input [B, in] (shared by all maps) -> [n, B, out] with one product.
    """

    def __init__(self, n, in_features, out_features):
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features).uniform_(-bound, bound))

    def forward(self, x, ids=None):
        """ids: optional list of k map indices for an input [k, B, in] (default: all n)."""
        if x.dim() == 2:    # shared input: one [B, in] x [in, n*out] product
            w = self.weight.transpose(0, 1).reshape(self.in_features, self.n * self.out_features)
            y = (x @ w).view(x.shape[0], self.n, self.out_features).transpose(0, 1)
            return y + self.bias
        if ids is None or len(ids) == self.n:
            return torch.baddbmm(self.bias, x, self.weight)
        return torch.baddbmm(self.bias[ids], x, self.weight[ids])

    def extra_repr(self):
        return f'n={self.n}, in_features={self.in_features}, out_features={self.out_features}'


# ----------------------------------------------------------------------------------------
# base class

class MultiTaskModel(nn.Module):
    """One linear head per task, and the interface shared by every model."""

    def __init__(self, in_features, hidden_feature, num_classes):
        super().__init__()
        self.in_features = in_features
        self.hidden_feature = hidden_feature
        self.num_classes = list(num_classes)
        self.tasks = len(self.num_classes)
        self.heads = nn.ModuleList(nn.Linear(hidden_feature, c) for c in self.num_classes)

    def check_inputs(self, xs):
        if not isinstance(xs, (list, tuple)) or len(xs) != self.tasks:
            n = len(xs) if isinstance(xs, (list, tuple)) else type(xs).__name__
            raise ValueError(f'{type(self).__name__} expects a list of {self.tasks} input batches '
                             f'(one per task), got {n}')
        for t, x in enumerate(xs):
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.in_features:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f'{type(self).__name__}: the batch of task {t} must be a tensor '
                                 f'[B, {self.in_features}], got {shape}')

    def run_per_task_layers(self, xs, layers, activation=None):
        """Run per-task layers (called as layer(x, ids) with one input per task) on the
        stacked batches of the tasks present; `activation` after each layer if given."""
        h, present = stack_tasks(xs)
        ids = torch.tensor(present, device=h.device)
        h = h.transpose(0, 1)                          # [B, T, in]: one input per task
        for layer in layers:
            h = layer(h, ids)
            if activation is not None:
                h = activation(h)
        return self.apply_heads(unstack_tasks(h.transpose(0, 1), xs, present))

    def apply_heads(self, hs):
        """logits[t] = hs[t] W_t + b_t, one small product per task."""
        return [head(h) for head, h in zip(self.heads, hs)]

    def forward(self, xs):
        raise NotImplementedError

    def reg_layers(self):
        """The multi-task layers that carry a regulariser (none by default)."""
        return []

    def regularization(self, c):
        """sum over reg_layers of layer.regularization(c); the float 0. if there are none."""
        total = 0.
        for layer in self.reg_layers():
            total = total + layer.regularization(c)
        return total


# ----------------------------------------------------------------------------------------
# the models

class STL(MultiTaskModel):
    """Single-task learning: a separate 3-layer net per task, nothing shared.

        h1_t = relu(x W1_t + b1_t),  h2_t = relu(h1_t W2_t + b2_t),  h3_t = relu(h2_t W3_t + b3_t)
        logits_t = h3_t V_t + c_t

    The T nets are held as stacked weights [T, in, out] and run with one batched product
    per layer (batches zero-padded to the largest one when the sizes differ; tasks with an
    empty batch are left out).
    """

    def __init__(self, in_features, hidden_feature, num_classes):
        super().__init__(in_features, hidden_feature, num_classes)
        T, H = self.tasks, hidden_feature
        self.layers = nn.ModuleList([StackedLinear(T, in_features, H), StackedLinear(T, H, H),
                                     StackedLinear(T, H, H)])

    def forward(self, xs):
        self.check_inputs(xs)
        h, present = stack_tasks(xs)                   # [T, B, in]
        for layer in self.layers:
            h = F.relu(layer(h, present))
        return self.apply_heads(unstack_tasks(h, xs, present))


class Hard3(MultiTaskModel):
    """Hard parameter sharing: the three hidden layers are shared by all tasks.

        h = relu(W3 relu(W2 relu(W1 x + b1) + b2) + b3),   logits_t = h V_t + c_t

    All tasks' batches go through the shared layers as one concatenated batch.
    """

    def __init__(self, in_features, hidden_feature, num_classes):
        super().__init__(in_features, hidden_feature, num_classes)
        H = hidden_feature
        self.backbone = nn.Sequential(nn.Linear(in_features, H), nn.ReLU(),
                                      nn.Linear(H, H), nn.ReLU(),
                                      nn.Linear(H, H), nn.ReLU())

    def forward(self, xs):
        self.check_inputs(xs)
        x, _, sizes = concat_tasks(xs)
        return self.apply_heads(torch.split(self.backbone(x), sizes))


class MRN(MultiTaskModel):
    """Multilinear Relationship Network (Long et al. 2017): three MRN_Linear layers.

        h1_t = relu(x W1_t + b1_t), h2_t = relu(h1_t W2_t + b2_t), h3_t = relu(h2_t W3_t + b3_t)

    with per-task weights tied by the tensor-normal prior
        R = c * sum_layers vec(W)^T (Omega_T kron Omega_out kron Omega_in) vec(W)
    (`regularization(c)`, once per step). `update()` re-estimates the precision matrices of
    every layer; `after_step(iteration)`, which the trainer calls after every optimizer
    step, does so every `update_interval` steps. As in the original, the layers use
    no batch norm and no dropout (MRN_Linear(..., dropout=False, bn=False)).
    """

    def __init__(self, in_features, hidden_feature, num_classes, regularization_task=True,
                 regularization_feature=True, regularization_input=True, update_interval=50):
        super().__init__(in_features, hidden_feature, num_classes)
        T, H = self.tasks, hidden_feature
        self.update_interval = update_interval
        opts = dict(dropout=False, bn=False, regularization_task=regularization_task,
                    regularization_feature=regularization_feature,
                    regularization_input=regularization_input, update_interval=update_interval)
        self.layers = nn.ModuleList([MRN_Linear(in_features, H, T, **opts), MRN_Linear(H, H, T, **opts),
                                     MRN_Linear(H, H, T, **opts)])

    def forward(self, xs):
        self.check_inputs(xs)
        return self.run_per_task_layers(xs, self.layers)      # ReLU inside the layers

    def reg_layers(self):
        return list(self.layers)

    def update(self):
        for layer in self.layers:
            layer.update()

    def after_step(self, iteration):
        if iteration % self.update_interval == 0:
            self.update()


class SoftOrder(MultiTaskModel):
    """Soft layer ordering (Meyerson & Miikkulainen 2018).

        h1 = relu(W0 x + b0)                                   (shared first layer)
        h_{d+1} = sum_l s[t, d, l] relu(W_l h_d + b_l),  d = 1, 2,  l in {1, 2}
        s[t, d, :] = softmax(S[t, d, :])

    The two shared layers W_1, W_2 are applied at both depths, mixed by per-task weights.
    S has shape [T, 2, 2] (sized by the number of tasks), initialised 0.01 * N(0, 1).
    Each shared layer runs once per depth on the concatenated batch of all tasks and every
    row is mixed with the weights of its task.
    """

    def __init__(self, in_features, hidden_feature, num_classes):
        super().__init__(in_features, hidden_feature, num_classes)
        H = hidden_feature
        self.first = nn.Linear(in_features, H)
        self.shared = nn.ModuleList([nn.Linear(H, H), nn.Linear(H, H)])
        self.S = nn.Parameter(0.01 * torch.randn(self.tasks, 2, 2))

    def forward(self, xs):
        self.check_inputs(xs)
        x, task_ids, sizes = concat_tasks(xs)
        s = torch.softmax(self.S, dim=-1)[task_ids]    # [N, depth, layer]
        h = F.relu(self.first(x))
        for d in range(2):
            h = s[:, d, 0:1] * F.relu(self.shared[0](h)) + s[:, d, 1:2] * F.relu(self.shared[1](h))
        return self.apply_heads(torch.split(h, sizes))


class DMTRL(MultiTaskModel):
    """Deep Multi-Task Representation Learning (Yang & Hospedales 2017): three DMTRL_Linear.

        h1_t = relu(x W1[:, :, t] + b1[:, t]),  h2_t = relu(h1_t W2[:, :, t] + b2[:, t]),
        h3_t = relu(h2_t W3[:, :, t] + b3[:, t]),
    where each W_l [in, out, T] is kept factorised (method Tucker, TT or LAF) and only the
    slices of the tasks at hand are used, factor by factor. The original stacks the three layers with no
    nonlinearity (a linear model); we put a ReLU after each layer like every other model.
    `regularization(c)` is the layers' trace-norm penalty (the original has none: use c=0).
    """

    def __init__(self, in_features, hidden_feature, num_classes, method='Tucker'):
        super().__init__(in_features, hidden_feature, num_classes)
        T, H = self.tasks, hidden_feature
        self.method = method
        self.layers = nn.ModuleList([DMTRL_Linear(in_features, H, T, method), DMTRL_Linear(H, H, T, method),
                                     DMTRL_Linear(H, H, T, method)])

    def forward(self, xs):
        self.check_inputs(xs)
        return self.run_per_task_layers(xs, self.layers, F.relu)

    def reg_layers(self):
        return list(self.layers)


class CrossStitch(MultiTaskModel):
    """Cross-stitch networks (Misra et al. 2016): one column (3-layer net) per task,
    the columns' activations mixed after every layer.

        g1_j = relu(x W1_j + b1_j),            h1_i = sum_j A1[i, j] g1_j
        g2_j = relu(h1_j W2_j + b2_j),         h2_i = sum_j A2[i, j] g2_j
        g3_j = relu(h2_j W3_j + b3_j),         h3_i = sum_j A3[i, j] g3_j
        logits_t = h3_t V_t + c_t              (a row of task t reads column t)

    A1, A2, A3 are T x T, initialised 0.01 * N(0, 1) as in the original; before every
    forward each row is rescaled in place (no gradient) to unit L2 norm.
    As in the original, every column sees every row: the mix combines the T columns'
    activations of the same sample, and a sample of task t is read from column t. So the
    cost is T times that of Hard3. The T columns of a layer are one batched product on the
    concatenated batch of all tasks; the last mix is computed only for each row's own task.
    """

    def __init__(self, in_features, hidden_feature, num_classes):
        super().__init__(in_features, hidden_feature, num_classes)
        T, H = self.tasks, hidden_feature
        self.columns = nn.ModuleList([StackedLinear(T, in_features, H), StackedLinear(T, H, H),
                                      StackedLinear(T, H, H)])
        self.stitch = nn.Parameter(0.01 * torch.randn(3, T, T))

    @torch.no_grad()
    def normalize_stitch(self):
        self.stitch.div_(self.stitch.norm(dim=-1, keepdim=True))

    def forward(self, xs):
        self.check_inputs(xs)
        self.normalize_stitch()
        x, task_ids, sizes = concat_tasks(xs)
        T = self.tasks
        h = x                                          # [N, in], shared by all columns
        for layer, A in zip(self.columns[:2], self.stitch[:2]):
            g = F.relu(layer(h))                       # [T, N, H]
            h = (A @ g.reshape(T, -1)).view_as(g)      # h_i = sum_j A[i, j] g_j
        g = F.relu(self.columns[2](h))                 # [T, N, H]
        a = self.stitch[2][task_ids]                   # [N, T]: the row of each sample's task
        h = torch.bmm(a.unsqueeze(1), g.transpose(0, 1)).squeeze(1)     # [N, H]
        return self.apply_heads(torch.split(h, sizes))


class MMoE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts (Ma et al. 2018) with E = 6 experts.

        e_k(x) = relu(W3_k relu(W2_k relu(W1_k x + b1_k) + b2_k) + b3_k),  k = 1..E
        g_t(x) = softmax_k(G_t x),   G_t [E, in], no bias, initialised 0.01 * N(0, 1)
        h = sum_k g_t(x)_k e_k(x),   logits_t = h V_t + c_t

    The experts are stacked weights [E, in, out] run with one batched product per layer on
    the concatenated batch of all tasks; each row uses its own task's gate.
    """

    def __init__(self, in_features, hidden_feature, num_classes, experts=6):
        super().__init__(in_features, hidden_feature, num_classes)
        E, H = experts, hidden_feature
        self.experts = experts
        self.layers = nn.ModuleList([StackedLinear(E, in_features, H), StackedLinear(E, H, H),
                                     StackedLinear(E, H, H)])
        self.gates = nn.Parameter(0.01 * torch.randn(self.tasks, E, in_features))

    def forward(self, xs):
        self.check_inputs(xs)
        x, task_ids, sizes = concat_tasks(xs)
        N, E = x.shape[0], self.experts
        h = x
        for layer in self.layers:
            h = F.relu(layer(h))                       # [E, N, H]
        # every task's gate logits for every row ([N, T*E], cheap), then each row's own task
        logits = (x @ self.gates.view(-1, self.in_features).t()).view(N, self.tasks, E)
        g = torch.softmax(logits[torch.arange(N, device=x.device), task_ids], dim=-1)     # [N, E]
        h = torch.bmm(g.unsqueeze(1), h.transpose(0, 1)).squeeze(1)                      # [N, H]
        return self.apply_heads(torch.split(h, sizes))


class TAAN(MultiTaskModel):
    """Task Adaptive Activation Network: three TAL_Linear layers (README, "TAL: the TAAN layer").

        a = W h + b,   h' = relu(a) + sum_m alpha[t, m] relu(basis_m - a)

    W, b and the basis points are shared by all tasks; each task t has its own activation
    through alpha[t]. `regularization(c)` sums the layers' functional regulariser
    (`regularize` in {None, 'tracenorm', 'distance', 'cosine'}). The layers use the
    original's TAL_Linear defaults: no batch norm, no dropout, no alpha normalisation.
    All tasks' batches go through each layer in one per-row call.
    """

    def __init__(self, in_features, hidden_feature, num_classes, basis=24, regularize=None):
        super().__init__(in_features, hidden_feature, num_classes)
        T, H = self.tasks, hidden_feature
        self.layers = nn.ModuleList([TAL_Linear(in_features, H, basis, T, regularize=regularize),
                                     TAL_Linear(H, H, basis, T, regularize=regularize),
                                     TAL_Linear(H, H, basis, T, regularize=regularize)])

    def forward(self, xs):
        self.check_inputs(xs)
        h, task_ids, sizes = concat_tasks(xs)
        for layer in self.layers:
            h = layer(h, task_ids, per_row=True)       # activation inside the layer
        return self.apply_heads(torch.split(h, sizes))

    def reg_layers(self):
        return list(self.layers)


# ----------------------------------------------------------------------------------------
# construction and loss

def build_model(name, in_features, hidden_feature, num_classes, *, basis=24, regularize=None,
                method='Tucker', regularization_task=True, regularization_feature=True,
                regularization_input=True, update_interval=50):
    """Build the model called `name` (one of MODELS) for len(num_classes) tasks."""
    if name not in MODELS:
        raise ValueError(f'unknown model {name!r}; choose one of {", ".join(MODELS)}')
    for what, value in (('in_features', in_features), ('hidden_feature', hidden_feature)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{what} must be a positive int, got {value!r}')
    num_classes = list(num_classes)
    if not num_classes or not all(isinstance(c, int) and c >= 1 for c in num_classes):
        raise ValueError(f'num_classes must be a non-empty list of positive ints (one per task), '
                         f'got {num_classes!r}')
    args = (in_features, hidden_feature, num_classes)
    if name == 'STL':
        return STL(*args)
    if name == 'Hard3':
        return Hard3(*args)
    if name == 'MRN':
        return MRN(*args, regularization_task=regularization_task,
                   regularization_feature=regularization_feature,
                   regularization_input=regularization_input, update_interval=update_interval)
    if name == 'SoftOrder':
        return SoftOrder(*args)
    if name == 'DMTRL':
        return DMTRL(*args, method=method)
    if name == 'CrossStitch':
        return CrossStitch(*args)
    if name == 'MMoE':
        return MMoE(*args)
    return TAAN(*args, basis=basis, regularize=regularize)


def multitask_loss(logits, labels):
    """L_t = C_t * mean over the batch and classes of BCE-with-logits(logits_t, y_t)
    (a sum over classes, mean over the batch); total = sum_t L_t / T.
    Returns (total, [L_1, ..., L_T])."""
    if len(logits) != len(labels) or not logits:
        raise ValueError(f'multitask_loss needs one label batch per logits batch, got {len(logits)} '
                         f'logits and {len(labels)} labels')
    per_task = []
    for t, (z, y) in enumerate(zip(logits, labels)):
        if z.shape != y.shape:
            raise ValueError(f'task {t}: logits {tuple(z.shape)} and labels {tuple(y.shape)} differ in shape')
        per_task.append(F.binary_cross_entropy_with_logits(z, y.to(z.dtype)) * z.shape[1])
    return torch.stack(per_task).sum() / len(per_task), per_task
