"""Running a test body on several CPU processes with torch.distributed's gloo backend:
`run_ranks(worker, world, *args)` spawns `world` processes, each running
worker(rank, world, *args) inside an initialized default group, and returns what each
returned (torch.save'd through a temporary folder). A failing rank fails the test with its
traceback. The processes inherit TRITON_INTERPRET from the test setup."""

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tritium.models.parallel import exit_rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main(rank: int, world: int, port: int, folder: str, worker, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = worker(rank, world, *args)
        torch.save(result, os.path.join(folder, f"{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise  # to mp.spawn, which reports it and ends the other ranks
    exit_rank()  # as tritium's own ranks end: teardown could abort a rank that is done


def saved_checkpoints(tmp_path_factory, factories: dict, seed: int) -> dict:
    """name -> a folder holding the transformers model factories[name]() built after
    seeding with `seed` and saved with save_pretrained."""
    folders = {}
    for name, factory in factories.items():
        torch.manual_seed(seed)
        folders[name] = tmp_path_factory.mktemp(name)
        factory().save_pretrained(folders[name])
    return folders


def run_ranks(worker, world: int, *args) -> list:
    """[worker(rank, world, *args) for each rank], run in `world` spawned processes."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_main, args=(world, _free_port(), folder, worker, args), nprocs=world)
        return [torch.load(os.path.join(folder, f"{rank}.pt"), weights_only=False) for rank in range(world)]
