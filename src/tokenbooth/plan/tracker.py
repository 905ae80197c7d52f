"""Counting the bytes a PyTorch program keeps alive, without running it on real data.

`LiveBytes` is a TorchDispatchMode: every tensor an operator returns is looked at, its storage counted once
while it lives (a weak reference says when it dies), and the highest total kept. Under torch's
`FakeTensorMode` the operators allocate nothing and compute nothing, but they return tensors with the real
shapes, dtypes and storages, including every tensor autograd saves for the backward pass, the optimizer's
state and the intermediate buffers of each kernel's Python-visible decomposition. So the peak is what a real
run allocates through PyTorch's allocator (what `torch.cuda.max_memory_allocated` reports), minus what
kernels allocate privately (cuBLAS workspaces) and the allocator's own slack: see `ALLOCATOR_RESERVE`.

`fake_run()` puts both modes on the stack; everything built inside (a 7B model included) costs no memory.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch._C._profiler import _EventType
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode

# Convolution kernels convert layouts in private buffers the dispatcher never sees: oneDNN (CPU) holds a copy
# of the output in its blocked layout, cuDNN (GPU) a workspace of up to about the output's size. The planner
# counts one output-sized buffer alive during each convolution. (Only the VQ image tokenizers convolve.)
CONVOLUTIONS = ("convolution", "convolution_backward")

# What a GPU needs beyond the tensors: the CUDA context (~0.3-0.5 GB), cuBLAS/cuDNN workspaces and the caching
# allocator's fragmentation. A plan "fits" a budget when its tensor peak plus this reserve does.
ALLOCATOR_RESERVE = 1.0e9


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive now (`now`) and at most since the last `reset_peak()` (`peak`, and by
    region: `peaks`), and the floating-point operations of the matrix products since then by region (`flops`,
    torch's FLOP formulas; torch's FlopCounterMode itself cannot be stacked here: its module tracking keeps
    tensors alive)."""

    def __init__(self):
        super().__init__()
        self.now = 0
        self.peak = 0
        self.flops: dict[str, int] = {}  # by region
        self.region = "run"  # what the program is doing now (`region()`): the peak is also kept per region
        self.layer: str | None = None  # in a backward pass, the decoder layer being gone through (`follow_layers`)
        self.peaks: dict[str, int] = {}
        self._sizes: dict[int, int] = {}
        self._formulas = FlopCounterMode(display=False).flop_registry

    def reset_peak(self) -> None:
        self.peak = self.now
        self.peaks = {"start": self.now}
        self.flops = {}

    def _high(self, total: int) -> None:
        self.peak = max(self.peak, total)
        # Within a region, the backward pass, the forward pass and what runs without autograd (gradient
        # clipping, ...) are kept apart too: each has its own linear growth with depth.
        if torch._C._current_autograd_node() is not None:
            if self.layer == "middle":
                return  # a middle layer's moments lie between the first's and the last's (linear in its index)
            key = f"{self.region}/backward/{self.layer or 'head'}"
        else:
            key = f"{self.region}/{'forward' if torch.is_grad_enabled() else 'no-grad'}"
        self.peaks[key] = max(self.peaks.get(key, 0), total)

    def _count(self, t: torch.Tensor) -> None:
        if _is_wrapper(t):
            # A quantized weight's wrapper: its inner tensors hold the bytes. Counted here too (by storage, so
            # once), since a wrapper's copy (quantize_layers' copy_layouts) makes them out of this mode's sight.
            for name in t.__tensor_flatten__()[0]:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    self._count(inner)
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.now += size
        self._high(self.now)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.now -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tree_map_only(torch.Tensor, self._count, out)
        if func.overloadpacket.__name__ in CONVOLUTIONS and isinstance(out, torch.Tensor):
            self._high(self.now + out.untyped_storage().nbytes())
        formula = self._formulas.get(func.overloadpacket)
        if formula is not None:
            self.flops[self.region] = self.flops.get(self.region, 0) + formula(*args, **kwargs, out_val=out)
        return out


def _is_wrapper(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, torch.nn.Parameter, FakeTensor) and not isinstance(t, FakeTensor) \
        and hasattr(t, "__tensor_flatten__")


_ACTIVE: list[LiveBytes] = []  # the counter of the fake run in progress, if any


def set_region(name: str) -> str | None:
    """Names what the program does from now on (e.g. "optimizer"), for the fake run in progress (a real run
    ignores it); returns the previous name. A phase's peak is the largest of its regions' peaks; `estimate`
    extrapolates each region's in depth on its own, since one region (the VQ decoder, the optimizer step) may
    dominate a cut-down model and another the full one."""
    if not _ACTIVE:
        return None
    previous, _ACTIVE[-1].region = _ACTIVE[-1].region, name
    return previous


def restart_peak() -> None:
    """Forgets the peaks so far, in the fake run in progress (a real run ignores it): a phase that needs an
    earlier moment's state alive (the validation pictures, in the middle of training) counts from here."""
    if _ACTIVE:
        _ACTIVE[-1].reset_peak()


def follow_layers(layers: list[torch.nn.Module]) -> None:
    """Tells the fake run in progress which of `layers` (the decoder layers, first to last) the backward pass
    is going through: the first one it meets (the model's last), the last one, or one in the middle. During a
    backward pass the live bytes move linearly with the layer's index (gradients accumulate, saved inputs are
    freed), so with the head's moments apart every label's peak is linear in depth, while the largest of them
    can pass from one label to another as the model deepens."""
    if not _ACTIVE:
        return
    live = _ACTIVE[-1]
    names = ["last"] + ["middle"] * (len(layers) - 2) + ["first"] if len(layers) > 1 else ["first"]

    def entering(name):
        def hook(grad):
            live.layer = name

        return hook

    for index, layer in enumerate(layers):
        def forward_hook(module, args, output, name=names[index], index=index):
            if torch._C._current_autograd_node() is not None:
                return  # recomputed under checkpointing, inside the backward pass
            if index == 0:
                live.layer = None  # a new forward pass: its backward starts at the head
            hidden = output[0] if isinstance(output, tuple) else output
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(entering(name))

        layer.register_forward_hook(forward_hook)


@contextlib.contextmanager
def region(name: str):
    previous = set_region(name)
    try:
        yield
    finally:
        if previous is not None:
            set_region(previous)


@contextlib.contextmanager
def fake_run():
    """Fake tensors with live-byte accounting: `with fake_run() as live: ...; live.peak`. Real tensors met
    inside (a small constant table some library builds eagerly) are taken as fake copies."""
    live = LiveBytes()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    swap = torch.utils.swap_tensors

    def swap_fake(t1, t2):
        # Module.to()/.float() swap a fake parameter for its converted copy, which torch refuses while the
        # fake mode's memo holds weak references to either; the memo is a cache, so it is dropped first.
        fake.fake_tensor_converter.tensor_memo.clear()
        swap(t1, t2)

    torch.utils.swap_tensors = swap_fake
    _ACTIVE.append(live)
    try:
        with fake, live:
            yield live
    finally:
        torch.utils.swap_tensors = swap
        _ACTIVE.remove(live)


@contextlib.contextmanager
def outside_fake():
    """Runs its body with real tensors (e.g. a library's constant tables built from Python data), in the
    middle of a `fake_run`."""
    with _disable_current_modes():
        yield


def measured_peak(setup, body) -> int:
    """Runs `body(setup())` for real on the CPU under torch's profiler and returns the most bytes the CPU
    allocator held during `body`, counting from before `setup` (so what setup left alive is included). This is
    the independent measurement the planner is validated against (benchmarks/memory.py): the allocator's own
    events, kernels' private buffers included."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        state = setup()
        with record_function("tokenbooth-phase"):
            body(state)
    allocations, starts = [], []

    def walk(node):
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        elif node.name == "tokenbooth-phase":
            starts.append(node.start_time_ns)
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    now, peak = 0, 0
    for time, size in sorted(allocations):
        now += size
        if time >= starts[0]:
            peak = max(peak, now)
    return peak
