"""Bytes of live tensor storage in this process, and their peak: the CPU's missing max_memory_allocated.

    with LiveTensorBytes() as probe:            # counts every tensor alive now: model, optimizer, batch
        train_step()
    probe.before, probe.peak                    # bytes at the start, and the most at any moment inside

On a GPU, torch.cuda.max_memory_allocated answers "how much at the peak"; torch's CPU allocator keeps no
statistics. The profiler does see the CPU allocator (week 5's measure_step_memory reads its memory
timeline), but only on the threads it profiles: when gloo's worker thread drops the last reference to a
collective's buffer, that free is never reported, and the running total drifts upward by a different
amount on every run. This probe counts storages instead, from Python, so a free counts on whatever thread
it happens:

- At the start, every tensor the garbage collector can see is counted once per storage (views share one).
  A tensor subclass such as FSDP2's DTensor is counted by the plain tensors inside it.
- While open, it is a TorchDispatchMode: every op's outputs pass through it, and a storage it has not seen
  is added, with a weak reference whose callback subtracts it when the storage is freed.
- FSDP2 frees and re-allocates a gathered parameter by resizing its storage in place (to 0 bytes, then
  back), which no op reports: UntypedStorage.resize_ is wrapped while the probe is open.

It counts every tensor of the process, not only the step's: measure in a fresh process (a rank started
with start_method="spawn"), not in one that holds other work's tensors, such as a notebook or a test session.
What it does not see: memory that is not a tensor's (gloo's own buffers, Python objects), scratch a kernel
allocates and frees inside itself, and tensors created on threads where the mode is not active (gloo's
workers, which allocate little). A test holds it to the profiler's count on one process, where the profiler
misses nothing.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorBytes"]


def _plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that own storage: tensor itself, or the inner tensors of a subclass (DTensor's local)."""
    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [plain for name in names for plain in _plain_tensors(getattr(tensor, name))]


class LiveTensorBytes(TorchDispatchMode):
    """Counts live tensor storage bytes from entry to exit: `before` at entry, `peak` the maximum (see module)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.before = 0
        self.peak = 0
        self.peak_at = "the start"  # the op whose output, or the resize, that reached the peak
        self._op = "the start"
        self._sizes: dict[int, int] = {}  # storage id (its StorageImpl address) -> bytes counted
        self._refs: dict[int, weakref.ref] = {}
        self._resize = torch.UntypedStorage.resize_

    def _count(self, tensor: torch.Tensor) -> None:
        for plain in _plain_tensors(tensor):
            if plain.device.type == "meta":
                continue
            storage = plain.untyped_storage()
            key = storage._cdata
            if key in self._sizes:
                continue
            self._sizes[key] = storage.nbytes()
            self._refs[key] = weakref.ref(storage, lambda _, key=key: self._forget(key))
            self._grew(storage.nbytes())

    def _forget(self, key: int) -> None:
        """Weak-reference callback: the storage was freed (on any thread)."""
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def _grew(self, nbytes: int) -> None:
        self.live += nbytes
        if self.live > self.peak:
            self.peak, self.peak_at = self.live, self._op

    def __enter__(self) -> LiveTensorBytes:
        gc.collect()  # what is unreachable now must not count as alive
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):  # type(), not isinstance: no object's __class__ runs
                self._count(obj)
        self.before = self.peak = self.live
        probe, resize = self, self._resize

        def counted_resize(storage: torch.UntypedStorage, nbytes: int):
            key = storage._cdata
            result = resize(storage, nbytes)
            probe._op = "UntypedStorage.resize_"
            if key in probe._sizes:
                probe._grew(storage.nbytes() - probe._sizes[key])
                probe._sizes[key] = storage.nbytes()
            return result

        torch.UntypedStorage.resize_ = counted_resize
        return super().__enter__()

    def __exit__(self, *exc_info: object) -> None:
        torch.UntypedStorage.resize_ = self._resize
        super().__exit__(*exc_info)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._op = str(func)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._count(leaf)
        return out
