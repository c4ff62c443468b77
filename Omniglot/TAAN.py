"""Omniglot networks: TAAN and two reference points with the same trunk.

Every alphabet is a task t with C_t classes. All three networks map a 105x105 image to
the logits of its alphabet's characters with the trunk

    4 x [3x3 conv (no padding) -> BatchNorm -> activation -> 2x2 max-pool]
        channels 1 -> 6 -> 12 -> 24 -> 64,  spatial 105 -> 51 -> 24 -> 11 -> 4
    flatten (64 * 4 * 4 = 1024) -> linear 1024 -> 512 -> activation
    head_t: linear 512 -> C_t          (weights N(0, 0.01), bias 0)

and differ only in what the tasks share:

* `TAAN`: every weight of the trunk is shared; each task has its own activation
  f_t(a) = relu(a) + sum_m alpha[t, m] relu(basis_m - a) in every layer (TAL_Conv2d,
  TAL_Linear).
* `HardSharing`: the trunk is shared with plain ReLU (the usual multi-task baseline).
* `SingleTask`: every task has its own trunk (no sharing at all).

All networks take every task's batch in one call: x [B, 1, 105, 105] and task_ids [B]
(rows of any task order); `forward` returns the logits [B, C_max] of each row's own task:
row i holds its alphabet's C_t logits, then -inf (C_max = the most classes of any task), so
a cross-entropy or an argmax over the row is that over the task's classes, and every shape
is known before the data is (torch.compile traces the networks without graph breaks).
`forward_task(x, t)` runs one task alone, as the original code did (used to check the
batched path).

Batch norm in training mode: the batched forward normalises with the statistics of the
whole multi-task batch (all alphabets' images together) and updates the running
statistics once per step. The original ran the alphabets one after another, so each
alphabet's 5 images were normalised with their own statistics and the running statistics
were updated T times per step. In eval mode (running statistics) both give the same
outputs. SingleTask keeps per-task statistics (its batch-norm channels are per task).

Training loss (`multitask_loss`) and parameter groups (`param_groups`) follow the original:

    L = (1/T) sum_t CE(logits_t, y_t) + sum_layers c * R(layer)
    Adam(weight decay 0.005), learning rate lr for the trunk and 50 lr for the heads.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from Layers import TAL_Conv2d, TAL_Linear, rows_linear
from Layers.TAL_pytorch import C0_ORIGINAL
from Layers._tasks import check_task_range
from Omniglot.dataTools import IMAGE_SIZE
CHANNELS = (1, 6, 12, 24, 64)
FLAT = 64 * 4 * 4
HIDDEN = 512
HEAD_LR_FACTOR = 50.0
WEIGHT_DECAY = 0.005
MODELS = ("taan", "hard", "stl")


def check_task_ids(task_ids, num_tasks):
    """ValueError unless task_ids is a 1-D integer tensor with every id in 0..num_tasks-1 (on a
    GPU the range is checked on the device, without waiting: see check_task_range)."""
    if not isinstance(task_ids, torch.Tensor):
        raise ValueError(f"task ids must be a 1-D LongTensor (one id per image), got {type(task_ids).__name__}")
    if task_ids.dim() != 1 or task_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"task ids must be a 1-D LongTensor (one id per image), got {task_ids.dtype} "
                         f"of shape {tuple(task_ids.shape)}")
    check_task_range(task_ids, num_tasks, ValueError, owner="the network has")


def multitask_loss(logits, labels, task_ids, num_tasks):
    """Mean over the tasks with rows of the per-task cross-entropy (mean over its rows).

    logits [..., B, C] (each row's own task's logits, -inf past its classes), labels [..., B]
    (or [B], shared), task_ids [B]. Returns [...] (a scalar for one network)."""
    if not task_ids.numel():
        raise ValueError("multitask_loss: no task has any row")
    lead = logits.shape[:-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.expand(lead).reshape(-1),
                         reduction="none").view(lead)
    sums = ce.new_zeros(*lead[:-1], num_tasks).index_add_(-1, task_ids, ce)
    counts = ce.new_zeros(num_tasks).index_add_(0, task_ids, ce.new_ones(task_ids.shape))
    present = counts > 0
    means = torch.where(present, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return means.sum(-1) / present.sum().to(ce.dtype)


def _check_input(x, task_ids, num_tasks):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images x of shape [B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_task_ids(task_ids, num_tasks)
    if task_ids.numel() != x.shape[0]:
        raise ValueError(f"expected one task id per image: x has {x.shape[0]} rows, "
                         f"task_ids has shape {tuple(task_ids.shape)}")


def _check_task(t, num_tasks):
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_tasks:
        raise ValueError(f"task must be an int in 0..{num_tasks - 1}, got {t!r}")


class HeadsAtFactorLR:
    """Adam over a network whose `heads` (a module) learn at 50x the rate of the rest, and the
    logits mask of its tasks' classes."""

    def _init_classes(self, num_classes):
        if not num_classes or min(num_classes) < 1:
            raise ValueError(f"num_classes must list at least one class per task, got {num_classes}")
        self.num_classes = [int(c) for c in num_classes]
        self.num_tasks = len(self.num_classes)
        classes = torch.tensor(self.num_classes)
        # [T, C_max] bool: which logits are classes of each task (moves with .to(), not saved)
        self.register_buffer("class_mask", torch.arange(max(self.num_classes))[None, :] < classes[:, None],
                             persistent=False)

    def mask_logits(self, logits, task_ids):
        """-inf past each row's task's classes (logits [..., B, C_max], task_ids [B])."""
        return logits.masked_fill(~self.class_mask[task_ids], float("-inf"))

    def param_groups(self, lr):
        """Adam groups: the trunk at lr, the heads at 50 lr (as the original)."""
        heads = list(self.heads.parameters())
        head_ids = {id(p) for p in heads}
        trunk = [p for p in self.parameters() if id(p) not in head_ids]
        return [{"params": trunk, "lr": lr}, {"params": heads, "lr": HEAD_LR_FACTOR * lr}]

    def make_optimizer(self, lr, weight_decay=WEIGHT_DECAY):
        """Adam over `param_groups(lr)` (L2 weight decay 0.005 as the original). The fused
        implementation (same update, one kernel for all tensors) is used for float32/64
        parameters on the CPU or CUDA; call after moving the model to its device."""
        params = list(self.parameters())
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
                    for p in params)
        return torch.optim.Adam(self.param_groups(lr), lr=lr, weight_decay=weight_decay, fused=fused)


class _OmniglotNet(HeadsAtFactorLR, nn.Module):
    """What the three networks share: the per-alphabet heads and the optimiser groups."""

    def __init__(self, num_classes):
        super().__init__()
        self._init_classes(num_classes)
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, c) for c in self.num_classes)
        for head in self.heads:
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)
        # row c of task t's padded head is row min(c, C_t - 1) of its own (the padding is masked)
        starts = torch.tensor([0] + self.num_classes[:-1]).cumsum(0)
        last = torch.tensor(self.num_classes) - 1
        self.register_buffer("head_rows", starts[:, None] + torch.minimum(torch.arange(max(self.num_classes)),
                                                                          last[:, None]), persistent=False)

    def apply_heads(self, h, task_ids):
        """Logits [B, C_max] of each row's own head (h [B, 512]), -inf past its classes: the
        heads padded to [T, C_max, 512], the rows of each task in one batched product."""
        weight = torch.cat([head.weight for head in self.heads])[self.head_rows]
        bias = torch.cat([head.bias for head in self.heads])[self.head_rows]
        return self.mask_logits(rows_linear(h, task_ids, weight, bias), task_ids)

    def regularization(self, c):
        """Sum of the layers' c * R(layer); the float 0. for networks without a regulariser."""
        return 0.


class TAAN(_OmniglotNet):
    """Shared conv trunk with task-adaptive activations (the paper's Omniglot network).

        a_l = BN(conv_l(h_{l-1})),   h_l = maxpool2(f_t^l(a_l)),   l = 1..4
        h_5 = f_t^5(W h_4 + b),      logits_t = head_t(h_5)
        f_t^l(a) = relu(a) + sum_m alpha_l[t, m] relu(basis_l[m] - a)

    regularization(c) = sum_l c * R(alpha_l, basis_l) for the chosen regulariser R.
    """

    def __init__(self, num_classes, basis=32, regularize=None, c0=C0_ORIGINAL):
        super().__init__(num_classes)
        T = self.num_tasks
        self.convs = nn.ModuleList(
            TAL_Conv2d(cin, cout, 3, basis, T, bn=True, regularize=regularize, c0=c0)
            for cin, cout in zip(CHANNELS[:-1], CHANNELS[1:]))
        self.fc = TAL_Linear(FLAT, HIDDEN, basis, T, regularize=regularize, c0=c0)

    def tal_layers(self):
        """(name, layer) of every TAL layer, input to output."""
        return [(f"conv{i + 1}", conv) for i, conv in enumerate(self.convs)] + [("dense1", self.fc)]

    def forward(self, x, task_ids):
        _check_input(x, task_ids, self.num_tasks)
        for conv in self.convs:
            x = F.max_pool2d(conv(x, task_ids, per_row=True), 2)
        h = self.fc(x.flatten(1), task_ids, per_row=True)
        return self.apply_heads(h, task_ids)

    def forward_task(self, x, t):
        _check_task(t, self.num_tasks)
        for conv in self.convs:
            x = F.max_pool2d(conv(x, t), 2)
        return self.heads[t](self.fc(x.flatten(1), t))

    def regularization(self, c):
        return sum(layer.regularization(c) for _, layer in self.tal_layers())


class HardSharing(_OmniglotNet):
    """Shared trunk with ReLU; only the heads are task-specific.

        h_l = maxpool2(relu(BN(conv_l(h_{l-1})))),  h_5 = relu(W h_4 + b),  logits_t = head_t(h_5)
    """

    def __init__(self, num_classes):
        super().__init__(num_classes)
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 3) for cin, cout in zip(CHANNELS[:-1], CHANNELS[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm2d(cout) for cout in CHANNELS[1:])
        self.fc = nn.Linear(FLAT, HIDDEN)

    def features(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = F.max_pool2d(F.relu(bn(conv(x))), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x, task_ids):
        _check_input(x, task_ids, self.num_tasks)
        return self.apply_heads(self.features(x), task_ids)

    def forward_task(self, x, t):
        _check_task(t, self.num_tasks)
        return self.heads[t](self.features(x))


class SingleTask(_OmniglotNet):
    """One independent HardSharing-like trunk per task, all run in one call.

    The T trunks are stacked into grouped layers: conv_l is one Conv2d with T groups
    (T*C_in -> T*C_out channels; group t holds task t's filters), BN has T*C_out channels,
    and the dense layer is a Conv1d(T*1024, T*512, 1, groups=T). Task t's images go into
    channel group t of a [n, T, 105, 105] batch (n = the largest number of images of any
    task; missing rows are zeros and their outputs are dropped). Every group is initialised
    like its own nn.Conv2d / nn.Linear, so this is exactly T separate networks.

    In training mode every task must have the same number of rows (as `sample_all` gives),
    since padded rows would enter the batch-norm statistics.
    """

    def __init__(self, num_classes):
        super().__init__(num_classes)
        T = self.num_tasks
        self.convs = nn.ModuleList(nn.Conv2d(T * cin, T * cout, 3, groups=T)
                                   for cin, cout in zip(CHANNELS[:-1], CHANNELS[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm2d(T * cout) for cout in CHANNELS[1:])
        self.fc = nn.Conv1d(T * FLAT, T * HIDDEN, 1, groups=T)

    def _trunk(self, x):
        """x [n, T, H, W] (task t in channel t) -> [n, T, 512]."""
        n = x.shape[0]
        for conv, bn in zip(self.convs, self.bns):
            x = F.max_pool2d(F.relu(bn(conv(x))), 2)
        h = F.relu(self.fc(x.reshape(n, self.num_tasks * FLAT, 1)))
        return h.view(n, self.num_tasks, HIDDEN)

    def forward(self, x, task_ids):
        _check_input(x, task_ids, self.num_tasks)
        T, B = self.num_tasks, x.shape[0]
        if torch.compiler.is_compiling():
            return self.apply_heads(self._grouped_rows(x, task_ids), task_ids)
        counts = torch.bincount(task_ids, minlength=T).tolist()
        if self.training and len(set(counts)) != 1:
            raise ValueError("SingleTask in training mode needs the same number of images for every "
                             f"task in a batch (as sample_all gives); got counts {counts}")
        n = max(counts)
        grouped = torch.arange(T, device=x.device).repeat_interleave(n)
        if len(set(counts)) == 1 and torch.equal(task_ids, grouped):      # the sample_all layout
            return self.apply_heads(self._grouped_rows(x, task_ids), task_ids)
        # place row i of task t at (position of i within task t, t)
        order = torch.argsort(task_ids, stable=True)
        starts = torch.cumsum(torch.tensor([0] + counts[:-1], device=x.device), 0)
        pos = torch.empty_like(task_ids)
        pos[order] = torch.arange(B, device=x.device) - starts[task_ids[order]]
        grid = x.new_zeros(n, T, IMAGE_SIZE, IMAGE_SIZE)
        grid[pos, task_ids] = x[:, 0]
        return self.apply_heads(self._trunk(grid)[pos, task_ids], task_ids)

    def _grouped_rows(self, x, task_ids):
        """The trunk's output [B, 512] for the sample_all layout: B / T images of every task,
        grouped by task. A compiled forward (whose shapes cannot depend on the ids) takes this
        layout only, checked on the device."""
        T, B = self.num_tasks, x.shape[0]
        if B % T:
            raise ValueError(f"a compiled SingleTask network takes the same number of images of every task, "
                             f"grouped by task (as sample_all gives): {B} images for {T} tasks")
        n = B // T
        grouped = torch.arange(T, device=x.device).repeat_interleave(n)
        torch._assert_async((task_ids == grouped).all(), "a compiled SingleTask network takes the same number "
                            "of images of every task, grouped by task (as sample_all gives)")
        h = self._trunk(x.view(T, n, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 1).contiguous())     # [n, T, 512]
        return h.transpose(0, 1).reshape(B, HIDDEN)

    def forward_task(self, x, t):
        """Task t's network alone, from the slices of the grouped weights."""
        _check_task(t, self.num_tasks)
        for conv, bn in zip(self.convs, self.bns):
            co = conv.out_channels // self.num_tasks
            s = slice(t * co, (t + 1) * co)
            a = F.conv2d(x, conv.weight[s], conv.bias[s])
            a = F.batch_norm(a, bn.running_mean[s], bn.running_var[s], bn.weight[s], bn.bias[s],
                             self.training, bn.momentum, bn.eps)
            x = F.max_pool2d(F.relu(a), 2)
        s = slice(t * HIDDEN, (t + 1) * HIDDEN)
        h = F.relu(F.linear(x.flatten(1), self.fc.weight[s, :, 0], self.fc.bias[s]))
        return self.heads[t](h)


def build_model(name, num_classes, basis=32, regularize=None, c0=C0_ORIGINAL):
    """'taan' (with basis, regularize, c0), 'hard' or 'stl' (case-insensitive)."""
    key = str(name).lower()
    if key == "taan":
        return TAAN(num_classes, basis=basis, regularize=regularize, c0=c0)
    if regularize is not None:
        raise ValueError(f"model {name!r} has no TAL layers: regularize must be None, got {regularize!r}")
    if key == "hard":
        return HardSharing(num_classes)
    if key == "stl":
        return SingleTask(num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
