"""Which process this is, from what `torchrun` and `accelerate launch` put in the environment: the one rank-0 helper
(`is_main`), read without torch, accelerate or a process group, so that the scripts' error lines (cli), the trackers
and the data-parallel plumbing (distributed, which re-exports these) ask it the same way."""
import os

# The names each launcher uses, torch's first (the same lists accelerate reads for the CPU).
SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


def _env_int(names, default):
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return int(value)
    return default


def world_size():
    """How many processes the launcher started (1 when run plainly); read from the environment, no process group needed."""
    return max(1, _env_int(SIZE_VARS, 1))


def rank():
    """This process's global rank, 0..world_size()-1 (0 when run plainly)."""
    return _env_int(RANK_VARS, 0)


def local_rank():
    """This process's rank on its machine: the GPU it uses."""
    return _env_int(LOCAL_RANK_VARS, 0)


def local_world_size():
    """How many processes share this machine (its CPU cores, its DataLoader workers)."""
    return max(1, _env_int(LOCAL_SIZE_VARS, world_size()))


def is_main():
    """True on the one process that writes files, prints and scores (rank 0); True when run plainly."""
    return rank() == 0
