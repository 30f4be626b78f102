"""What the bench scripts print beside a ratio: the top operators of one step by self time
(torch.profiler) and the peak memory of each side, each side measured in a process of its own
(the process's max RSS on a CPU; torch's allocator peak on CUDA)."""

import multiprocessing
import queue as queue_module
import resource

import torch
from torch.profiler import ProfilerActivity, profile


def top_ops(step, dev, n=10):
    """The n operators with the most self time in one call of step(), as rows
    {op, self_ms, share, calls}; on CUDA the device time ranks them."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        step()
        if dev.type == 'cuda':
            torch.cuda.synchronize()
    attr = 'self_device_time_total' if dev.type == 'cuda' else 'self_cpu_time_total'
    events = list(prof.key_averages())
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [
        {
            'op': e.key,
            'self_ms': getattr(e, attr) / 1e3,
            'share': getattr(e, attr) / total,
            'calls': e.count,
        }
        for e in events[:n]
    ]


def print_top_ops(name, rows):
    print(f'top operators of one step, {name} (self time):')
    for r in rows:
        print(f"  {r['share']:6.1%} {r['self_ms']:10.1f} ms {r['calls']:6d} calls  {r['op']}")


def _peak_child(build, args, steps, device, queue):
    try:
        dev = torch.device(device)
        step = build(*args)
        if dev.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(dev)
        for i in range(steps):
            step(i)
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)
            queue.put((True, torch.cuda.max_memory_allocated(dev) / 2**20))
        else:
            queue.put((True, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))  # KiB
    except BaseException as e:  # reported to the parent, which raises it with the side's name
        queue.put((False, f'{type(e).__name__}: {e}'))


def peak_memory_mib(build, args, steps, device):
    """Peak memory (MiB) of a fresh process that runs step = build(*args), then step(i) for i
    in range(steps): max RSS on a CPU (interpreter and weights included, the same for every
    side), the allocator's peak over the steps on CUDA. build must be a module-level function."""
    ctx = multiprocessing.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(build, args, steps, device, queue))
    proc.start()
    while True:
        try:
            ok, value = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f'memory measurement of {build.__name__}: exited {proc.exitcode} with no result'
                ) from None
    proc.join()
    if not ok:
        raise RuntimeError(f'memory measurement of {build.__name__}: {value}')
    return value
