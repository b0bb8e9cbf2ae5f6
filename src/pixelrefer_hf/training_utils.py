"""What the training examples share at the end of a run launched with `accelerate launch`.

`end_training` replaces `accelerator.end_training()` in every example. With DDP that call, barrier or not, leaves the
process group alive: `destroy_process_group` only unregisters it, and the C++ `Reducer` of each
`DistributedDataParallel` wrapper still owns it. The Reducer then destroys it when the wrapper is freed (as the
script's `main` returns, or at interpreter exit), and does so with the GIL held. `~ProcessGroupGloo` joins gloo's
worker threads, and a worker may still be retiring a finished collective (the final barrier and the all_gathers it
waited for): that frees tensors that have Python objects, which takes the GIL. The process hangs with training done;
`py-spy dump --native` on the stuck rank of a 2-process CPU run:

    MainThread:  std::thread::join <- ProcessGroupGloo::~ProcessGroupGloo <- Reducer::~Reducer
                 <- pybind11::class_<c10d::Reducer, ...>::dealloc_without_manipulating_gil
    gloo worker: gil_scoped_acquire <- ConcretePyInterpreterVTable::decref <- TensorImpl::decref_pyobject
                 <- AsyncAllgatherWork::~AsyncAllgatherWork <- AsyncBarrierWork::~AsyncBarrierWork
                 <- ProcessGroupGloo::runLoop

torch's Python handle on a process group releases the GIL while it destroys the group. So `end_training` frees the
Reducers while it holds such a handle, and drops that handle last: the group, gloo's threads included, is gone when the
function returns, and a worker that needs the GIL meanwhile gets it. (Python code that keeps handles of its own delays
that to the last of them, still without the GIL: `torch.distributed.nn`, imported once the group exists, keeps the
group in default arguments; the examples import it, through transformers, long before.)
"""

import gc

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def end_training(accelerator) -> None:
    """End a run: every process meets, then the trackers stop and the process group is destroyed, all before returning.

    Call it last, after saving (`save_model` writes on the main process only; the barrier keeps the other processes
    from tearing down meanwhile). Every `DistributedDataParallel` wrapper in the process is unusable afterwards (its
    Reducer is freed); the models they wrap are untouched.
    """
    if not (dist.is_available() and dist.is_initialized()):
        accelerator.end_training()  # one process: trackers only
        return
    accelerator.wait_for_everyone()
    group = dist.group.WORLD  # a Python handle: the last one to go destroys the group without the GIL
    # accelerate keeps the unwrapped models, the Trainer (or the script) the wrappers: look for every wrapper.
    for wrapper in [obj for obj in gc.get_objects() if isinstance(obj, DistributedDataParallel)]:
        for name in ("logger", "reducer", "process_group"):  # the Logger holds the Reducer too
            if getattr(wrapper, name, None) is not None:
                setattr(wrapper, name, None)  # the Reducer goes now, while `group` keeps the group alive
    accelerator.end_training()  # trackers, then `destroy_process_group`: the group is unregistered
    del group  # ~ProcessGroupGloo runs here and joins gloo's threads, the GIL released
